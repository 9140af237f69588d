"""The `pref` schedule: preference only, every step."""

from __future__ import annotations

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class PrefOnly(Stateless):
    name = "pref"
    slots = ("pref",)

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"pref": 1.0}
