"""SFT-family objectives, on demonstrations (prompt + completion)."""

from __future__ import annotations

from torch import Tensor

from unitune.objectives.types import SeqLogps


def sft(lp: SeqLogps) -> Tensor:
    """Standard SFT: mean negative log-likelihood over all response tokens of the batch.

    `loss = -sum_i logp(y_i|x_i) / sum_i |y_i|` (token mean at the batch level, as TRL/HF do).
    """
    return -lp.logp.sum() / lp.n_tokens.sum().clamp(min=1)
