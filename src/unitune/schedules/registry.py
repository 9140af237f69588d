"""Schedules by name: each step, which objectives run and with what weight.

`lam` is the weight / probability of the preference objective (as in heshandevaka/XRIGHT);
`1 - lam` belongs to SFT. A schedule is one file (one class with `@register_schedule`) plus its
import line in `schedules/__init__.py`. The class declares its facts:

- `slots`: the objective slots it trains (`("sft",)`, `("pref",)` or both); the config asks the
  data of exactly these;
- `depends_on_total_steps`: whether its plan depends on `train.max_steps` (sequential's switch
  step), so that a resumed run may not change it;

- `plan(step, probe)` returns `{"sft": w}`, `{"pref": w}` or both; `probe()` gives the no-grad
  losses of both objectives on the current batches (only MAXRIGHT calls it);
- `observe(losses)` receives the losses just computed (floats, by slot);
- `resets_reference(step)`: whether the training reference becomes the current model before
  `step` (sequential's preference stage);
- `state_dict()` / `load_state_dict(state)`: everything that changes during a run, as JSON values,
  so that a resumed run makes the same decisions.

The constructor's keyword-only parameters are of two kinds. Those named in `CONTEXT` come from the
run (`lam`, `total_steps`, `seed`, the own-loss optima `loss_sft_star` / `loss_pref_star`); every
other one is an option, set as a key of the config's `schedule:` section and validated from the
signature and its type hints (`k` for MAXRIGHT). A new schedule needs no trainer edit.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ConfigDict, create_model

Plan = dict[str, float]
LossProbe = Callable[[], dict[str, float]]  # no-grad losses of both objectives on current batches
CONTEXT = ("lam", "total_steps", "seed", "loss_sft_star", "loss_pref_star")


class Schedule(Protocol):
    name: str
    slots: tuple[str, ...]
    depends_on_total_steps: bool

    def plan(self, step: int, probe: LossProbe) -> Plan: ...
    def observe(self, losses: dict[str, float]) -> None: ...
    def resets_reference(self, step: int) -> bool: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SCHEDULES: dict[str, type] = {}


def register_schedule(cls: type) -> type:
    """Register `cls` under `cls.name`; its non-context keyword-only parameters become options."""
    bad = [s for s in getattr(cls, "slots", ()) if s not in ("sft", "pref")]
    if not getattr(cls, "slots", ()) or bad:
        raise ValueError(f"schedule {cls.name!r}: slots must be 'sft' and/or 'pref', got {bad}")
    hints = typing.get_type_hints(cls.__init__)
    fields = {
        p.name: (hints.get(p.name, Any), p.default)
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CONTEXT
    }
    cls.options = create_model(f"{cls.name}_options", __config__=ConfigDict(extra="forbid"),
                               **fields)  # fmt: skip
    SCHEDULES[cls.name] = cls
    return cls


def build_schedule(name: str, options: dict[str, Any] | None = None, **context: Any) -> Schedule:
    """The schedule `name` with its validated `options` and the context values it takes."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    params = inspect.signature(cls.__init__).parameters
    wanted = {k: context[k] for k in CONTEXT if k in params}
    missing = [k for k in wanted if wanted[k] is None]
    if missing:
        raise ValueError(f"schedule {name!r} needs {', '.join(missing)}")
    return cls(**wanted, **cls.options(**(options or {})).model_dump())


def context_of(name: str) -> set[str]:
    """The run values (`CONTEXT`) that schedule `name` takes, e.g. MAXRIGHT's own-loss optima."""
    params = inspect.signature(SCHEDULES[name].__init__).parameters
    return {k for k in CONTEXT if k in params}


# the schedule of a config that names none
DEFAULT_SCHEDULE = "alright"


class Stateless:
    """The defaults of a schedule that keeps no state, never resets the reference and whose plan
    does not depend on the run's length."""

    depends_on_total_steps = False

    def observe(self, losses: dict[str, float]) -> None:
        pass

    def resets_reference(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
