"""The `maxright` schedule (arXiv 2410.15483): step on the objective with the larger
weighted gap."""

from __future__ import annotations

from typing import Any

from unitune.schedules.registry import LossProbe, Plan, Stateless, register_schedule


@register_schedule
class Maxright(Stateless):
    """MAXRIGHT (arXiv 2410.15483): step on the objective with the larger weighted gap.

    Stale gaps `g_sft = (1 - lam) * (l_sft - l_sft*)`, `g_pref = lam * (l_pref - l_pref*)`, each in
    the objective's own loss against that loss's optimum. Both are initialised from one no-grad
    probe and recomputed under no-grad on the current batches every `k` steps (at steps 0, k, 2k,
    ...); the objective stepped on is refreshed from the loss just computed.
    """

    name = "maxright"
    slots = ("sft", "pref")

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
