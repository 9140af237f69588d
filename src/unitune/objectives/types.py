"""The tensors of log-probs that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SeqLogps:
    """Per-sequence summed response log-probs under the policy (and the reference, if needed)."""

    logp: Tensor  # [B] sum_t log pi_theta(y_t | x, y_<t)
    n_tokens: Tensor  # [B] |y|
    ref_logp: Tensor | None = None  # [B] same sum under pi_ref

    @property
    def ratio(self) -> Tensor:
        """r(y) = logp_theta(y|x) - logp_ref(y|x) (summed)."""
        if self.ref_logp is None:
            raise ValueError("this objective needs reference log-probs, but none were given")
        return self.logp - self.ref_logp

    @property
    def avg_logp(self) -> Tensor:
        return self.logp / self.n_tokens.clamp(min=1)


@dataclass
class PairLogps:
    chosen: SeqLogps
    rejected: SeqLogps
