"""The `mix` schedule: a weighted sum of both objectives each step."""

from __future__ import annotations

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class Mix(Stateless):
    """`(1 - lam) * f_sft + lam * f_pref` on one SFT batch and one preference batch (both run).

    An objective whose weight is 0 (`lam` of 0 or 1) is not computed at all.
    """

    name = "mix"
    slots = ("sft", "pref")

    def __init__(self, *, lam: float):
        self.lam = lam

    def plan(self, step: int, probe: LossProbe) -> Plan:
        plan = {"sft": 1.0 - self.lam, "pref": self.lam}
        return {kind: w for kind, w in plan.items() if w > 0}
