"""Schedules: each step, which objectives run and with what weight.

`lam` is the weight / probability of the preference objective (as in heshandevaka/XRIGHT);
`1 - lam` belongs to SFT. A schedule's `plan(step)` returns `{"sft": w}`, `{"pref": w}` or both;
`observe(losses)` receives the losses just computed (floats, by kind).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Plan = dict[str, float]
LossProbe = Callable[[], dict[str, float]]  # no-grad losses of both objectives on current batches


class SFTOnly:
    name = "sft"

    def plan(self, step: int) -> Plan:
        return {"sft": 1.0}

    def observe(self, losses: dict[str, float]) -> None:
        pass


class PrefOnly(SFTOnly):
    name = "pref"

    def plan(self, step: int) -> Plan:
        return {"pref": 1.0}


class Sequential(SFTOnly):
    """SFT for the first `round((1 - lam) * T)` steps, then preference for the rest.

    The trainer resets the reference at `switch_step`: the preference stage's reference is the
    model at the end of the SFT stage, with its reference log-probs recomputed.
    """

    name = "sequential"

    def __init__(self, lam: float, total_steps: int):
        self.switch_step = round((1.0 - lam) * total_steps)

    def plan(self, step: int) -> Plan:
        return {"sft": 1.0} if step < self.switch_step else {"pref": 1.0}


class Mix(SFTOnly):
    """`(1 - lam) * f_sft + lam * f_pref` on one SFT batch and one preference batch (both run).

    An objective whose weight is 0 (`lam` of 0 or 1) is not computed at all.
    """

    name = "mix"

    def __init__(self, lam: float):
        self.lam = lam

    def plan(self, step: int) -> Plan:
        plan = {"sft": 1.0 - self.lam, "pref": self.lam}
        return {kind: w for kind, w in plan.items() if w > 0}


class Alright(SFTOnly):
    """ALRIGHT (arXiv 2410.15483): each step, `u ~ Bernoulli(lam)`; preference if `u`, else SFT.

    The generator is seeded from the run seed only, so every process draws the same sequence
    and all ranks step on the same objective without communicating.
    """

    name = "alright"

    def __init__(self, lam: float, seed: int):
        self.lam = lam
        self.generator = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)

    def plan(self, step: int) -> Plan:
        u = torch.rand((), generator=self.generator).item() < self.lam
        return {"pref": 1.0} if u else {"sft": 1.0}


class Maxright(SFTOnly):
    """MAXRIGHT (arXiv 2410.15483): step on the objective with the larger weighted gap.

    Stale gaps `g_sft = (1 - lam) * (f_sft - f_sft*)`, `g_pref = lam * (f_pref - f_pref*)`. Both are
    initialised from one no-grad pass and recomputed under no-grad on the current batches every
    `k` steps (at steps 0, k, 2k, ...); the objective stepped on is refreshed from the loss just
    computed.
    """

    name = "maxright"

    def __init__(self, lam: float, k: int, f_sft_star: float, f_pref_star: float, probe: LossProbe):
        self.lam, self.k, self.probe = lam, k, probe
        self.star = {"sft": f_sft_star, "pref": f_pref_star}
        self.weight = {"sft": 1.0 - lam, "pref": lam}
        self.gaps: dict[str, float] = {}
        self.probes = 0

    def _gap(self, kind: str, loss: float) -> float:
        return self.weight[kind] * (loss - self.star[kind])

    def plan(self, step: int) -> Plan:
        if step % self.k == 0 or not self.gaps:
            self.gaps = {kind: self._gap(kind, v) for kind, v in self.probe().items()}
            self.probes += 1
        kind = "sft" if self.gaps["sft"] >= self.gaps["pref"] else "pref"
        return {kind: 1.0}

    def observe(self, losses: dict[str, float]) -> None:
        for kind, v in losses.items():
            self.gaps[kind] = self._gap(kind, v)


def build_schedule(
    name: str,
    *,
    lam: float,
    total_steps: int,
    seed: int,
    k: int = 10,
    f_sft_star: float = 0.0,
    f_pref_star: float = 0.0,
    probe: LossProbe | None = None,
):
    if name == "sft":
        return SFTOnly()
    if name == "pref":
        return PrefOnly()
    if name == "sequential":
        return Sequential(lam, total_steps)
    if name == "mix":
        return Mix(lam)
    if name == "alright":
        return Alright(lam, seed)
    if name == "maxright":
        if probe is None:
            raise ValueError("maxright needs a loss probe")
        return Maxright(lam, k, f_sft_star, f_pref_star, probe)
    raise ValueError(f"unknown schedule {name!r}")
