"""The `sequential` schedule: SFT, then preference (the reference reset between)."""

from __future__ import annotations

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class Sequential(Stateless):
    """SFT for the first `round((1 - lam) * T)` steps, then preference for the rest.

    At `switch_step` the training reference becomes the model at the end of the SFT stage
    (`resets_reference`), with its reference log-probs recomputed.
    """

    name = "sequential"
    slots = ("sft", "pref")
    depends_on_total_steps = True  # switch_step = round((1 - lam) * max_steps)

    def __init__(self, *, lam: float, total_steps: int):
        self.switch_step = round((1.0 - lam) * total_steps)

    def plan(self, step: int, probe: LossProbe) -> Plan:
        return {"sft": 1.0} if step < self.switch_step else {"pref": 1.0}

    def resets_reference(self, step: int) -> bool:
        return step == self.switch_step and step > 0
