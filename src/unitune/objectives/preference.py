"""Preference-family objectives, on pairs (prompt, chosen y_w, rejected y_l)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from unitune.objectives.types import PairLogps


def dpo(lp: PairLogps, *, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290, eq. 7).

    `loss = -logsigmoid(beta * (r(y_w) - r(y_l)))`, `r(y) = logp_theta(y|x) - logp_ref(y|x)`
    summed over response tokens; mean over pairs. At `pi_theta = pi_ref` it is `log 2`.
    """
    margin = lp.chosen.ratio - lp.rejected.ratio
    return -F.logsigmoid(beta * margin).mean()
