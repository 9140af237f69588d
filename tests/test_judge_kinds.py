"""A judge kind is one `JudgeKind` and one line of `KINDS`: a kind registered inside the test is
accepted by the config, built by `make_judge` and gives a win rate; the config refuses a URL
for it, asking the same registry."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from unitune.config import ConfigError, parse_config
from unitune.judges.base import JudgeKind, JudgeOptions, Prompt
from unitune.judges.registry import KINDS, make_judge
from unitune.judges.winrate import win_rate


@dataclass(frozen=True)
class LengthJudge:
    """Pointwise: the closer a response's length (in characters) to the target, the better."""

    name: str
    target: int
    kind: str = "pointwise"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]:
        return [-abs(len(r) - self.target) for r in responses]


def build_length(argument: str, opts: JudgeOptions) -> LengthJudge:
    return LengthJudge(f"length:{argument}", int(argument))


LENGTH = JudgeKind(
    "length", build_length, usage="length:CHARS", what="closest length", argument="n"
)


def test_a_kind_registered_in_the_test_gives_a_win_rate(monkeypatch, tiny_config):
    monkeypatch.setitem(KINDS, "length", LENGTH)  # the one registry line
    judge = make_judge("length:5")
    assert judge.name == "length:5"
    prompts = ["a", "b", "c", "d"]
    responses = ["12345", "123", "1234567890", "1234"]
    references = ["1234", "12345", "1234", "1234"]
    # |len - 5|: responses 0, 2, 5, 1 against references 1, 0, 1, 1 -> win, loss, loss, tie
    result = win_rate(judge, prompts, responses, references)
    assert (result.wins, result.losses, result.ties) == (1, 2, 1)
    assert result.win_rate == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert result.judge == "length:5"

    raw = tiny_config("alright")
    cfg = parse_config({**raw, "eval": {"generate": True, "judge": "length:5"}})
    assert cfg.eval.judge == "length:5"
    with pytest.raises(ConfigError, match=re.escape("judge_url is for an openai:MODEL judge")):
        parse_config({**raw, "eval": {"judge": "length:5", "judge_url": "http://x"}})
    with pytest.raises(ConfigError, match=re.escape("judge 'length:': no n")):
        parse_config({**raw, "eval": {"judge": "length:"}})


def test_an_unregistered_kind_is_refused_naming_the_registered_ones(tiny_config):
    raw = tiny_config("alright")
    with pytest.raises(ConfigError) as info:
        parse_config({**raw, "eval": {"judge": "length:5"}})
    message = str(info.value)
    assert "unknown kind 'length'" in message
    assert "rm:PATH_OR_ID (a reward model), openai:MODEL (an OpenAI-compatible endpoint)" in message
