"""The `alright` schedule (arXiv 2410.15483): one objective per step, preference with
probability `lam`."""

from __future__ import annotations

from typing import Any

import torch

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class Alright(Stateless):
    """ALRIGHT (arXiv 2410.15483): each step, `u ~ Bernoulli(lam)`; preference if `u`, else SFT.

    The generator is seeded from the run seed only, so every process draws the same sequence
    and all ranks step on the same objective without communicating. Its state is saved.
    """

    name = "alright"
    slots = ("sft", "pref")

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
