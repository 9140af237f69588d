"""Programmatic rewards that need no model and no network, named `NAME:ARGUMENT`.

A programmatic reward is one function `make(argument) -> reward function` (TRL's signature; a
ValueError saying what is wrong with the argument) and one line in `PROGRAMMATIC`:

- `format:REGEX`: 1.0 when `re.search(REGEX, completion)` finds a match, else 0.0 (a format
  reward as TRL's `think_format_reward`, `trl/rewards/format_rewards.py`, with the pattern
  given by the user; anchor it with `^...$` and add `(?s)` to match the whole text).
- `length:N`: `-|words - N| / N`, `words` the completion's whitespace-separated words (not
  tokens: the same on every tokenizer): 0 at exactly N words, -1 at none or at 2N.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unitune.rewards.base import Completion, RewardFn, completion_text


def format_reward(pattern: str) -> RewardFn:
    """`format:REGEX`: 1.0 for a completion in which the pattern is found (`re.search`), else
    0.0. A ValueError for a pattern that does not compile."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"bad regular expression: {err}") from None

    def reward(
        prompts: Sequence[Any], completions: Sequence[Completion], completion_ids: Any, **_: Any
    ) -> list[float]:
        return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]

    reward.__name__ = "format"
    return reward


def length_reward(argument: str) -> RewardFn:
    """`length:N`: `-|words - N| / N` for a target of N words (a positive integer)."""
    try:
        target = int(argument)
    except ValueError:
        target = 0
    if target <= 0 or str(target) != argument.strip():
        raise ValueError(f"N must be a positive whole number of words, got {argument!r}")

    def reward(
        prompts: Sequence[Any], completions: Sequence[Completion], completion_ids: Any, **_: Any
    ) -> list[float]:
        return [-abs(len(completion_text(c).split()) - target) / target for c in completions]

    reward.__name__ = "length"
    return reward


@dataclass(frozen=True)
class Programmatic:
    """A programmatic reward kind: `make(argument)`, how its spec reads (`usage`), what it
    returns (`what`, shown when a spec is wrong)."""

    make: Callable[[str], RewardFn]
    usage: str
    what: str


PROGRAMMATIC: dict[str, Programmatic] = {
    "format": Programmatic(format_reward, "format:REGEX", "1.0 if the completion matches"),
    "length": Programmatic(length_reward, "length:N", "-|words - N| / N"),
}
