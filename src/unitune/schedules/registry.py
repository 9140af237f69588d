"""Schedules: each step, which objectives run and with what weight.

`lam` is the weight / probability of the preference objective (as in heshandevaka/XRIGHT);
`1 - lam` belongs to SFT. A schedule is one class plus `@register_schedule`:

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

import torch
from pydantic import ConfigDict, create_model

Plan = dict[str, float]
LossProbe = Callable[[], dict[str, float]]  # no-grad losses of both objectives on current batches
CONTEXT = ("lam", "total_steps", "seed", "loss_sft_star", "loss_pref_star")


class Schedule(Protocol):
    name: str

    def plan(self, step: int, probe: LossProbe) -> Plan: ...
    def observe(self, losses: dict[str, float]) -> None: ...
    def resets_reference(self, step: int) -> bool: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SCHEDULES: dict[str, type] = {}


def register_schedule(cls: type) -> type:
    """Register `cls` under `cls.name`; its non-context keyword-only parameters become options."""
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


class Stateless:
    """The defaults of a schedule that keeps no state and never resets the reference."""

    def observe(self, losses: dict[str, float]) -> None:
        pass

    def resets_reference(self, step: int) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register_schedule
class SFTOnly(Stateless):
    name = "sft"

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"sft": 1.0}


@register_schedule
class PrefOnly(Stateless):
    name = "pref"

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"pref": 1.0}


@register_schedule
class Sequential(Stateless):
    """SFT for the first `round((1 - lam) * T)` steps, then preference for the rest.

    At `switch_step` the training reference becomes the model at the end of the SFT stage
    (`resets_reference`), with its reference log-probs recomputed.
    """

    name = "sequential"

    def __init__(self, *, lam: float, total_steps: int):
        self.switch_step = round((1.0 - lam) * total_steps)

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"sft": 1.0} if step < self.switch_step else {"pref": 1.0}

    def resets_reference(self, step: int) -> bool:
        return step == self.switch_step and step > 0


@register_schedule
class Mix(Stateless):
    """`(1 - lam) * f_sft + lam * f_pref` on one SFT batch and one preference batch (both run).

    An objective whose weight is 0 (`lam` of 0 or 1) is not computed at all.
    """

    name = "mix"

    def __init__(self, *, lam: float):
        self.lam = lam

    def plan(self, step: int, probe: LossProbe) -> Plan:
        plan = {"sft": 1.0 - self.lam, "pref": self.lam}
        return {kind: w for kind, w in plan.items() if w > 0}


@register_schedule
class Alright(Stateless):
    """ALRIGHT (arXiv 2410.15483): each step, `u ~ Bernoulli(lam)`; preference if `u`, else SFT.

    The generator is seeded from the run seed only, so every process draws the same sequence
    and all ranks step on the same objective without communicating. Its state is saved.
    """

    name = "alright"

    def __init__(self, *, lam: float, seed: int):
        self.lam = lam
        self.generator = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)

    def plan(self, step: int, probe: LossProbe) -> Plan:
        u = torch.rand((), generator=self.generator).item() < self.lam
        return {"pref": 1.0} if u else {"sft": 1.0}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


@register_schedule
class Maxright(Stateless):
    """MAXRIGHT (arXiv 2410.15483): step on the objective with the larger weighted gap.

    Stale gaps `g_sft = (1 - lam) * (l_sft - l_sft*)`, `g_pref = lam * (l_pref - l_pref*)`, each in
    the objective's own loss against that loss's optimum. Both are initialised from one no-grad
    probe and recomputed under no-grad on the current batches every `k` steps (at steps 0, k, 2k,
    ...); the objective stepped on is refreshed from the loss just computed.
    """

    name = "maxright"

    def __init__(
        self, *, lam: float, loss_sft_star: float, loss_pref_star: float, k: int = 10
    ) -> None:
        if k < 1:
            raise ValueError(f"maxright: k must be >= 1, got {k}")
        self.lam, self.k = lam, k
        self.star = {"sft": loss_sft_star, "pref": loss_pref_star}
        self.weight = {"sft": 1.0 - lam, "pref": lam}
        self.gaps: dict[str, float] = {}
        self.probes = 0

    def _gap(self, kind: str, loss: float) -> float:
        return self.weight[kind] * (loss - self.star[kind])

    def plan(self, step: int, probe: LossProbe) -> Plan:
        if step % self.k == 0 or not self.gaps:
            self.gaps = {kind: self._gap(kind, v) for kind, v in probe().items()}
            self.probes += 1
        kind = "sft" if self.gaps["sft"] >= self.gaps["pref"] else "pref"
        return {kind: 1.0}

    def observe(self, losses: dict[str, float]) -> None:
        for kind, v in losses.items():
            self.gaps[kind] = self._gap(kind, v)

    def state_dict(self) -> dict[str, Any]:
        return {"gaps": dict(self.gaps), "probes": self.probes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gaps, self.probes = dict(state["gaps"]), int(state["probes"])
