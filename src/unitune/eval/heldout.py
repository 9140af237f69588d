"""Held-out metrics of the trade-off between the SFT and the preference objective.

All reported against the run's fixed starting reference (`pi_ref` = the starting model), so that
runs of every schedule are comparable (sequential's stage-2 training reference does not move them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unitune.objectives import REGISTRY, PairLogps, SeqLogps


def sft_metrics(seq: SeqLogps) -> dict[str, float]:
    """`f_sft`: token-mean NLL over the whole set; `deviation` m (MinorSFT paper):
    mean over (x, y) of `(logp_theta(y|x) - logp_ref(y|x)) / |y|`."""
    out = {"f_sft": float(REGISTRY["sft"].fn(seq))}
    if seq.ref_logp is not None:
        out["deviation"] = float((seq.ratio / seq.n_tokens.clamp(min=1)).mean())
    return out


def pref_metrics(pair: PairLogps, beta: float) -> dict[str, float]:
    """`f_pref`: DPO loss at `eval.beta` whatever the preference objective; reward accuracy
    `P(r(y_w) > r(y_l))`; mean reward margin `beta * (r(y_w) - r(y_l))`."""
    margin = pair.chosen.ratio - pair.rejected.ratio
    return {
        "f_pref": float(REGISTRY["dpo"].fn(pair, beta=beta)),
        "reward_acc": float((margin > 0).float().mean()),
        "reward_margin": float(beta * margin.mean()),
    }


def feedback_metrics(seq: SeqLogps, good: torch.Tensor, beta: float) -> dict[str, float]:
    """Unpaired feedback (`good`: desirable items): `f_pref` is the logistic loss
    `mean(-logsigmoid(s * beta * r))`, `s = +1` desirable, `-1` undesirable, at `eval.beta`
    whatever the objective (log 2 at `pi_theta = pi_ref`, as DPO's); reward accuracy is how often
    `sign(r)` agrees with desirability; margin `beta * (mean r(desirable) - mean r(undesirable))`.
    """
    r = seq.ratio
    sign = good.to(r.dtype) * 2 - 1
    out = {
        "f_pref": float(-F.logsigmoid(sign * beta * r).mean()),
        "reward_acc": float(((r > 0) == good).float().mean()),
    }
    if good.any() and (~good).any():
        out["reward_margin"] = float(beta * (r[good].mean() - r[~good].mean()))
    return out


def measures(pref_data: str | None, beta: float) -> dict[str, str]:
    """What `f_sft` and `f_pref` measure, for axis labels and reports."""
    out = {"f_sft": "held-out NLL per response token"}
    if pref_data == "pairs":
        out["f_pref"] = f"held-out DPO loss (\u03b2={beta:g})"
    elif pref_data == "unpaired":
        out["f_pref"] = f"held-out unpaired logistic loss (\u03b2={beta:g})"
    return out


@dataclass(frozen=True)
class Ideal:
    """The ideal point: optima of the metrics (`f_sft*`, `f_pref*`, for the ideal distance) and
    of the objectives' own losses (`loss_sft*`, `loss_pref*`, for MAXRIGHT's gaps)."""

    f_sft: float = 0.0
    f_pref: float = 0.0
    loss_sft: float = 0.0
    loss_pref: float = 0.0


def ideal_distance(f_sft: float, f_pref: float, f_sft_star: float, f_pref_star: float) -> float:
    """`sqrt((f_sft - f_sft*)^2 + (f_pref - f_pref*)^2)`."""
    return math.hypot(f_sft - f_sft_star, f_pref - f_pref_star)
