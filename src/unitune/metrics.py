"""Held-out metrics of the trade-off between the SFT and the preference objective.

All reported against the run's fixed starting reference (`pi_ref` = the starting model), so that
runs of every schedule are comparable (sequential's stage-2 training reference does not move them).
"""

from __future__ import annotations

import math

import torch

from unitune.objectives import REGISTRY, PairLogps, SeqLogps


def sft_metrics(seq: SeqLogps) -> dict[str, float]:
    """`f_sft`: token-mean NLL over the whole set; `deviation` m (MinorSFT paper):
    mean over (x, y) of `(logp_theta(y|x) - logp_ref(y|x)) / |y|`."""
    out = {"f_sft": float(REGISTRY["sft"].fn(seq))}
    if seq.ref_logp is not None:
        out["deviation"] = float((seq.ratio / seq.n_tokens.clamp(min=1)).mean())
    return out


def pref_metrics(pair: PairLogps, beta: float) -> dict[str, float]:
    """`f_pref`: DPO loss with the run's beta; reward accuracy `P(r(y_w) > r(y_l))`;
    mean reward margin `beta * (r(y_w) - r(y_l))`."""
    margin = pair.chosen.ratio - pair.rejected.ratio
    return {
        "f_pref": float(REGISTRY["dpo"].fn(pair, beta=beta)),
        "reward_acc": float((margin > 0).float().mean()),
        "reward_margin": float(beta * margin.mean()),
    }


def ideal_distance(f_sft: float, f_pref: float, f_sft_star: float, f_pref_star: float) -> float:
    """`sqrt((f_sft - f_sft*)^2 + (f_pref - f_pref*)^2)`."""
    return math.hypot(f_sft - f_sft_star, f_pref - f_pref_star)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0
