"""Objectives on unpaired feedback: one completion per prompt with a binary label or a score.

`fb.target` is 1.0 (desirable) / 0.0 (undesirable) for labels, or the score already mapped to
[0, 1] by the data layer; `r = fb.seq.ratio` is the summed log ratio against the reference.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unitune.objectives.types import FeedbackLogps, desirable


def kto(
    fb: FeedbackLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al., 2024, arXiv 2402.01306, eq. 7), reduced as TRL's `KTOTrainer`.

    `z = max(0, mean_j r(x_i, y_j))` over the mismatched (prompt, completion) pairs in `fb.kl`,
    detached: the batch estimate of KL(pi_theta || pi_ref). Per example
    desirable (`types.desirable(target)`, i.e. label 1): `lambda_D * (1 - sigma(beta * (r - z)))`,
    undesirable (label 0): `lambda_U * (1 - sigma(beta * (z - r)))`;
    the loss is the mean over all examples of the batch (TRL concatenates the weighted desirable
    and undesirable losses and takes their mean). TRL additionally averages `z` across processes;
    here it is the local batch's estimate.
    """
    if fb.kl is None:
        raise ValueError(
            "kto needs the KL batch (fb.kl: log-probs of mismatched prompt/completion pairs "
            "under the policy and the reference) to estimate KL(pi_theta || pi_ref); got None"
        )
    z = fb.kl.ratio.mean().clamp(min=0).detach()
    r = fb.seq.ratio
    losses = torch.where(
        desirable(fb.target),
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )
    return losses.mean()


def una_binary(
    fb: FeedbackLogps, *, beta: float = 0.01, loss: Literal["mse", "bce"] = "mse"
) -> Tensor:
    """UNA on binary feedback (Wang et al., 2024, arXiv 2408.15339).

    The implicit reward `s = sigma(beta * r)` is fitted to the label: `"mse"`: `(s - label)^2`;
    `"bce"`: `-[label * log s + (1 - label) * log(1 - s)]`, computed from the logit `beta * r`
    (stable for large |r|). Mean over examples.
    """
    logits = beta * fb.seq.ratio
    target = fb.target.to(logits.dtype)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return (torch.sigmoid(logits) - target).pow(2).mean()


def una_score(fb: FeedbackLogps, *, beta: float = 0.03) -> Tensor:
    """UNA on scalar feedback (Wang et al., 2024, arXiv 2408.15339).

    `loss = (sigma(beta * r) - score)^2`, mean over examples; `score = fb.target`, already mapped
    to [0, 1] by the data layer from the dataset's declared min/max.
    """
    return (torch.sigmoid(beta * fb.seq.ratio) - fb.target.to(fb.seq.logp.dtype)).pow(2).mean()
