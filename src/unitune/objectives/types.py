"""The tensors of log-probs that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


@dataclass
class RolloutLogps:
    """Sampled completions of a micro-batch for an online objective: whole groups of G samples
    per prompt, rows `i*G .. i*G+G-1` being prompt i's samples.

    Per-token tensors are `[N, T]` over the completion tokens; positions where `mask == 0`
    (padding, text after the first EOS) never reach a loss, whatever they hold.
    """

    logp: Tensor  # [N, T] log pi_theta at the sampling temperature (logits / T); grad
    mask: Tensor  # [N, T] 1.0 on completion tokens up to and including the first EOS
    old_logp: Tensor  # [N, T] pi_old, the policy that sampled (no grad)
    ref_logp: Tensor | None  # [N, T] the reference (no grad); None when the objective reads none
    # [N] the reward each sample trains on (shaped; for una_online mapped to [0, 1]); NaN:
    # unscorable (left out)
    rewards: Tensor
    group_size: int  # G
    max_new_tokens: int  # dr_grpo's constant
    # std of the rewards over the whole generation batch, every process (scale_rewards: batch)
    batch_std: float | None = None
    # dapo's normalizer: completion tokens of the generation batch over every process, divided
    # by (processes x steps_per_generation), i.e. the mean completion tokens of one micro-batch
    # of one process; the loop's mean over micro-batches and processes then gives TRL's
    # token-sum / all tokens. None: this micro-batch's own tokens
    num_items: float | None = None

    def seq(self, t: Tensor) -> Tensor:
        """`[N]`: `t` summed over each completion's unmasked tokens (masked entries ignored)."""
        return masked(t, self.mask).sum(-1)

    @property
    def n_tokens(self) -> Tensor:
        """`[N]` completion lengths |y| (EOS included)."""
        return self.mask.sum(-1)


def masked(t: Tensor, mask: Tensor) -> Tensor:
    """`t` with every position where `mask == 0` set to 0 (not multiplied: a NaN or inf there
    stays out of the value and of the gradient)."""
    return torch.where(mask.bool(), t, torch.zeros((), dtype=t.dtype, device=t.device))
