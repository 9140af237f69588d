"""SFT-family objectives, on demonstrations (prompt + completion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unitune.objectives.types import SeqLogps


def sft(lp: SeqLogps) -> Tensor:
    """Standard SFT: mean negative log-likelihood over all response tokens of the batch.

    `loss = -sum_i logp(y_i|x_i) / sum_i |y_i|` (token mean at the batch level, as TRL/HF do).
    """
    return -lp.logp.sum() / lp.n_tokens.sum().clamp(min=1)


def minor_sft(lp: SeqLogps, *, beta: float = 0.1, length_normalize: bool = False) -> Tensor:
    """MinorSFT (Xie et al., 2024, arXiv 2408.10642): SFT with DPO's implicit-reward sigmoid.

    Per sequence `l_i = -(2 / (beta * |y_i|)) * logsigmoid(beta * r(y_i))`, mean over sequences,
    with `r` the summed log ratio against the reference. Its gradient is
    `-(2/|y|) * sigma(-beta*r) * grad logp`: the per-token SFT gradient damped by
    `2*sigma(-beta*r)`, which is 1 at `pi_theta = pi_ref` and shrinks as the model moves away.

    Relation to `sft`: at `pi_theta = pi_ref` the gradient equals that of the *sequence mean of
    per-sequence token-mean NLL* (`mean_i -logp_i/|y_i|`). `sft` is the batch token mean
    (`-sum_i logp_i / sum_i |y_i|`); the two coincide when all `|y_i|` in the batch are equal.

    `length_normalize=True` is TorchRL's variant (`SFTLoss(loss_function="minor_sft")`, with its
    default `normalize_by_seq_length=True`): the length normalisation moves inside the sigmoid,
    `l_i = -(2/beta) * logsigmoid(beta * r(y_i) / |y_i|)`. TorchRL's `minor_sft_loss` omits the
    `2/beta` factor; we keep it [choice] so that, in both modes, the gradient at `pi_theta = pi_ref`
    is exactly the per-sequence token-mean SFT gradient (same learning-rate scale as SFT).
    TorchRL's value is ours times `beta/2`.
    """
    r = lp.ratio
    n = lp.n_tokens.clamp(min=1).to(r.dtype)
    if length_normalize:
        per_seq = -(2.0 / beta) * F.logsigmoid(beta * r / n)
    else:
        per_seq = -(2.0 / (beta * n)) * F.logsigmoid(beta * r)
    return per_seq.mean()


def uft(lp: SeqLogps, *, beta: float = 0.01) -> Tensor:
    """UFT (UNA on demonstrations; code ZhichaoWang970201/UNA-UFT).

    A demonstration is treated as feedback with the highest score: its implicit reward
    `sigma(beta * r(y))` is pulled towards 1, `loss = (sigma(beta * r(y)) - 1)^2`, mean over
    sequences. At `pi_theta = pi_ref` the loss is `1/4`.
    """
    return (torch.sigmoid(beta * lp.ratio) - 1.0).pow(2).mean()
