"""What a judge is: the two protocols (pointwise scores, pairwise preferences), the one error,
and `JudgeKind`, the row a judge kind adds to the registry (`registry.py`).

- **pointwise** (`score(prompts, responses, references) -> list[float]`): the model's response and
  the reference are scored alike; the higher score wins, scores within `tol` tie.
- **pairwise** (`prefer(prompts, first, second) -> list[float | None]`, 1.0 when the first
  response is better, 0.0 when the second is, 0.5 for a tie, None when the verdict could not be
  read): each comparison is asked in both orders (`winrate.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Prompt = list[dict[str, Any]] | str

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class JudgeError(RuntimeError):
    """A judge could not give its verdicts (endpoint unreachable, refused, bad answer)."""


@runtime_checkable
class PointwiseJudge(Protocol):
    name: str
    kind: str  # "pointwise"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    name: str
    kind: str  # "pairwise"

    def prefer(
        self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]: ...


Judge = PointwiseJudge | PairwiseJudge


@dataclass(frozen=True)
class JudgeOptions:
    """What `make_judge` passes to a kind's `build`, besides the spec's argument: the HTTP
    judge's `url` and `key_env` (and `http`: timeout, retries, backoff, workers), the reward
    model's `trust_remote_code` and `device`, and the `label` its errors start with."""

    url: str | None = None
    key_env: str = DEFAULT_KEY_ENV
    trust_remote_code: bool = False
    device: str | None = None
    label: str = "judge"
    http: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeKind:
    """A judge kind, named by the prefix of its spec (`NAME:ARGUMENT`).

    `build(argument, options)` returns the ready judge; `usage` (e.g. "rm:PATH_OR_ID") and
    `what` ("a reward model") are shown when a spec is wrong; `argument` names what follows the
    colon ("path", "model"); `url`: whether `eval.judge_url` / `--judge-url` applies to it.
    """

    name: str
    build: Callable[[str, JudgeOptions], Judge]
    usage: str
    what: str
    argument: str
    url: bool = False


def conversation_text(prompt: Prompt) -> str:
    """A prompt as plain text: a string as it is, messages as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
