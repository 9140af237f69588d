"""The `sft` schedule: SFT only, every step."""

from __future__ import annotations

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class SFTOnly(Stateless):
    name = "sft"
    slots = ("sft",)

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"sft": 1.0}
