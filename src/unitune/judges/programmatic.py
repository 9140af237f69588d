"""Programmatic judges: `fn(prompt, response, reference) -> float`, pointwise, named by a spec
without a colon (`demo`). Built in: `demo` (`demo.py`); more with `@register_judge("name")`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from unitune.judges.base import Prompt
from unitune.judges.demo import demo_score

PROGRAMMATIC: dict[str, Callable[[Prompt, str, str], float]] = {
    "demo": demo_score,
}


def register_judge(name: str) -> Callable[[Callable], Callable]:
    """Register `fn(prompt, response, reference) -> float` as the pointwise judge `name`."""
    if ":" in name or not name:
        raise ValueError(f"a judge name must be non-empty without ':', got {name!r}")

    def wrap(fn: Callable[[Prompt, str, str], float]) -> Callable:
        PROGRAMMATIC[name] = fn
        return fn

    return wrap


@dataclass(frozen=True)
class ProgrammaticJudge:
    name: str
    fn: Callable[[Prompt, str, str], float]
    kind: str = "pointwise"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]:
        return [
            float(self.fn(p, r, ref))
            for p, r, ref in zip(prompts, responses, references, strict=True)
        ]
