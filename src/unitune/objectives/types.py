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


@dataclass
class FeedbackLogps:
    """Unpaired feedback: one completion per prompt, with a label or a score.

    `target` is 1.0 (desirable) / 0.0 (undesirable) for labels, or the score mapped to [0, 1].
    `kl` holds mismatched (prompt_i, completion_j) pairs from the same batch, for KTO's estimate
    of KL(pi_theta || pi_ref); None when the objective does not need it.
    """

    seq: SeqLogps
    target: Tensor  # [B]
    kl: SeqLogps | None = None


@dataclass
class TokenLogps:
    """Per-token log-probs of the target tokens, for objectives that weight tokens (IFT).

    `logp[b, t]` is log p(token t | its prefix) at target positions and 0 elsewhere; `mask` marks
    the target positions. Shape [B, L].
    """

    logp: Tensor
    mask: Tensor

    @property
    def n_tokens(self) -> Tensor:
        return self.mask.sum(dim=1)


def desirable(target: Tensor) -> Tensor:
    """Which unpaired items count as desirable: `target >= 0.5` on the [0, 1] targets (labels are
    exactly 1.0 / 0.0; scores are mapped to [0, 1] by `score_range`). The one rule, for the
    objectives and the metrics alike."""
    return target >= 0.5
