"""The win rate (alpaca_eval-style) of a model's responses against references or opponents: the
mean over prompts of 1 (win) / 0.5 (tie) / 0 (loss), with its standard error
`std(outcomes, ddof=1) / sqrt(n)` (0 for a single prompt).

Pairwise judges are asked each comparison in both orders, model response first and the other
first, and the two verdicts are averaged, so a judge that favours a position gains nothing from
it. An unreadable verdict counts as a tie and is counted in `WinRate.unparsed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from unitune.judges.base import Judge, JudgeError, Prompt

DEFAULT_TIE_TOL = 1e-5


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    win_rate_se: float
    wins: int
    ties: int
    losses: int
    n: int
    judge: str
    unparsed: int = 0  # pairwise verdicts that could not be read (counted as ties)
    outcomes: tuple[float, ...] = field(default=(), repr=False)  # per prompt, in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        """The figures `eval.json` holds (no per-prompt outcomes)."""
        out = asdict(self)
        out.pop("outcomes")
        if not self.unparsed:
            out.pop("unparsed")
        return out


def win_rate(
    judge: Judge,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    references: Sequence[str],
    *,
    opponents: Sequence[str] | None = None,
    tol: float = DEFAULT_TIE_TOL,
) -> WinRate:
    """How often `responses` beat `references` under `judge` (win 1, tie 0.5, loss 0); or, given
    `opponents` (e.g. the starting model's responses), how often they beat those, the references
    still being what a pointwise judge scores both sides against.

    Pointwise judges score both sides in one call; scores within `tol` tie. Pairwise judges are
    asked with the model's response first and with the other first; the outcome of a prompt is
    the mean of the two verdicts (as the model's), so position bias cancels.
    """
    n = len(prompts)
    others = references if opponents is None else opponents
    if not n == len(responses) == len(references) == len(others):
        raise ValueError("prompts, responses and references must have the same length")
    if n == 0:
        raise ValueError("no prompts to judge")
    unparsed = 0
    if judge.kind == "pairwise":
        forward = judge.prefer(prompts, responses, others)
        backward = judge.prefer(prompts, others, responses)
        outcomes = []
        for f, b in zip(forward, backward, strict=True):
            unparsed += (f is None) + (b is None)
            first = 0.5 if f is None else f
            second = 0.5 if b is None else 1.0 - b
            outcomes.append((first + second) / 2)
    elif judge.kind == "pointwise":
        scores = judge.score([*prompts, *prompts], [*responses, *others], [*references] * 2)
        outcomes = [_compare(scores[i], scores[n + i], tol) for i in range(n)]
    else:
        raise ValueError(f"judge {judge.name!r}: unknown kind {judge.kind!r}")
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    return WinRate(
        win_rate=mean,
        win_rate_se=math.sqrt(var / n),
        wins=sum(o > 0.5 for o in outcomes),
        ties=sum(o == 0.5 for o in outcomes),
        losses=sum(o < 0.5 for o in outcomes),
        n=n,
        judge=judge.name,
        unparsed=unparsed,
        outcomes=tuple(outcomes),
    )


def _compare(model: float, reference: float, tol: float) -> float:
    if not (math.isfinite(model) and math.isfinite(reference)):
        raise JudgeError(f"a judge score is not finite ({model}, {reference})")
    if abs(model - reference) <= tol:
        return 0.5
    return 1.0 if model > reference else 0.0
