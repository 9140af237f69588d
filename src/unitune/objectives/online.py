"""Online objectives: losses on the policy's own samples, scored by rewards (`RolloutLogps`).

A micro-batch holds whole groups: rows `i*G .. i*G+G-1` are the G samples of prompt i. `logp`,
`old_logp` (pi_old, the policy that sampled) and `ref_logp` are per-token `[N, T]`; only tokens
where `mask == 1` count, whatever the other positions hold (`types.masked`). A NaN reward marks an
unscorable sample: it is left out of every statistic and carries no reward signal. The log-probs
are those of the sampling temperature; dividing the logits is the training side's.

Each loss is a scalar reduced as its source reduces one micro-batch (the loop averages the
micro-batches of a step); docs/methods.md and /work/shared/METHODS.md "Online training" give the
formulas and the choices made.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from unitune.objectives.preference import dpo, ipo
from unitune.objectives.types import PairLogps, RolloutLogps, SeqLogps, masked

# TRL's test for a zero standard deviation (`torch.isclose(std, 0)`: atol 1e-8)
ZERO_STD = 1e-8


# ------------------------------------------------------------------------------ group helpers
def _groups(rewards: Tensor, group_size: int, who: str) -> Tensor:
    """`rewards` `[N]` as `[N / G, G]`; an incomplete group is an error naming `who`."""
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{who}: {rewards.numel()} samples are not whole groups of {group_size} (rows i*G .. "
            "i*G+G-1 are prompt i's samples)"
        )
    return rewards.view(-1, group_size)


def _nanstd(g: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Bessel-corrected std of the non-NaN entries (TRL's `nanstd`) and their count; 0 where
    fewer than two entries are scored (TRL has NaN there; every use below gives 0 either way)."""
    ok = ~torch.isnan(g)
    n = ok.sum() if dim is None else ok.sum(dim, keepdim=True)
    x = torch.where(ok, g, g.new_zeros(()))
    mean = x.sum() / n.clamp(min=1) if dim is None else x.sum(dim, keepdim=True) / n.clamp(min=1)
    d = torch.where(ok, g - mean, g.new_zeros(()))
    sq = d.pow(2).sum() if dim is None else d.pow(2).sum(dim, keepdim=True)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    return torch.where(n > 1, std, g.new_zeros(())), n


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    std_floor: float = 1e-4,
    batch_std: float | None = None,
) -> Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2).

    `A_i = (R_i - mean_G R) / max(std, std_floor)`: the mean over the scored samples of i's group;
    `std` the Bessel-corrected std of the group (`scale="group"`), of the whole generation batch
    (`"batch"`: `batch_std`, gathered over every process by the training side; the rewards given
    here when None), or no division (`"none"`, Dr. GRPO arXiv 2503.20783). A NaN reward is left
    out of the mean and std and gets advantage 0; so does a group with one scored sample, and a
    group whose rewards are all equal gets 0 for every sample (no signal). TRL 1.16
    (`GRPOTrainer._generate_and_score_completions`) divides by `std + 1e-4` instead of
    `max(std, 1e-4)` (METHODS.md's floor): relative difference `1e-4 / std`, equal at zero std.
    """
    g = _groups(rewards, group_size, "group_advantages")
    ok = ~torch.isnan(g)
    n = ok.sum(1, keepdim=True)
    mean = torch.where(ok, g, g.new_zeros(())).sum(1, keepdim=True) / n.clamp(min=1)
    adv = g - mean
    if scale == "group":
        adv = adv / _nanstd(g, dim=1)[0].clamp(min=std_floor)
    elif scale == "batch":
        std = _nanstd(rewards)[0] if batch_std is None else g.new_tensor(float(batch_std))
        adv = adv / std.clamp(min=std_floor)
    elif scale != "none":
        raise ValueError(f"scale_rewards: {scale!r} is not one of group, batch, none")
    return torch.where(ok, adv, g.new_zeros(())).view(-1)


def zero_std_groups(rewards: Tensor, group_size: int) -> int:
    """How many groups have at least two scored samples, all with the same reward (std <= 1e-8,
    TRL's `isclose(std, 0)`): groups that give GRPO no signal. `frac_reward_zero_std` is this
    over the number of groups (TRL's figure, which counts samples of such groups over samples:
    the same with whole groups). A group with fewer than two scored samples is not counted
    (TRL: its std is NaN, not zero)."""
    std, n = _nanstd(_groups(rewards, group_size, "zero_std_groups"), dim=1)
    return int(((n > 1) & (std <= ZERO_STD)).sum())


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages (Ahmadian et al. 2024, arXiv 2402.14740, eq. 4; Kool et al. 2019).

    `A_i = R_i - mean_{j != i} R_j` over the scored samples j of i's group (TRL 1.16
    `RLOOTrainer._generate_and_score_completions`: nansum, divided by the scored count - 1). A NaN
    reward gets 0 and is no one's baseline; a sample with no scored sibling gets 0.
    """
    g = _groups(rewards, group_size, "leave_one_out_advantages")
    ok = ~torch.isnan(g)
    n = ok.sum(1, keepdim=True)
    x = torch.where(ok, g, g.new_zeros(()))
    baseline = (x.sum(1, keepdim=True) - x) / (n - 1).clamp(min=1)
    keep = ok & (n > 1)
    return torch.where(keep, g - baseline, g.new_zeros(())).view(-1)


def best_and_worst(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """The rows of the highest- and lowest-reward sample of each group that gives a pair: one
    whose scored rewards are not all equal (at least two scored samples, max > min). Ties for the
    best (worst) go to the first such sample. Returns `(best, worst)`, each `[pairs]`."""
    g = _groups(rewards, group_size, "best_and_worst")
    ok = ~torch.isnan(g)
    hi = torch.where(ok, g, g.new_full((), -torch.inf))
    lo = torch.where(ok, g, g.new_full((), torch.inf))
    top, best = hi.max(1)
    bottom, worst = lo.min(1)
    keep = ok.sum(1).gt(1) & (top > bottom)
    start = torch.arange(g.shape[0], device=g.device) * group_size
    return (start + best)[keep], (start + worst)[keep]


def pairless_groups(rewards: Tensor, group_size: int) -> int:
    """How many groups give `online_dpo` / `una_online_pair` no pair (all scored rewards equal,
    or fewer than two scored): left out of the loss, counted for the log."""
    groups = _groups(rewards, group_size, "pairless_groups").shape[0]
    return groups - best_and_worst(rewards, group_size)[0].numel()


# ------------------------------------------------------------------------------ shared pieces
def _zero(lp: RolloutLogps) -> Tensor:
    """A zero loss that is still a function of the policy (`backward` works, all grads 0)."""
    return (masked(lp.logp, lp.mask) * 0).sum()


def _reference(lp: RolloutLogps, who: str) -> Tensor:
    if lp.ref_logp is None:
        raise ValueError(f"{who}: needs reference log-probs (ref_logp), but none were given")
    return lp.ref_logp


def _seq(lp: RolloutLogps, t: Tensor, rows: Tensor) -> SeqLogps:
    return SeqLogps(lp.seq(lp.logp)[rows], lp.n_tokens[rows], lp.seq(t)[rows])


def _rewards(lp: RolloutLogps) -> Tensor:
    return lp.rewards.to(device=lp.logp.device)


# ------------------------------------------------------------------------------ UNA
def una_online(
    lp: RolloutLogps, *, beta: float = 0.03, reference: Literal["init", "rollout"] = "init"
) -> Tensor:
    """Online UNA (Wang et al. 2024, arXiv 2408.15339, eq. 9: the RLHF case, with an explicit
    reward model in place of PPO).

    Per sample `(sigma(beta * r(y)) - s(y))^2` with `r(y) = sum_t (log pi_theta - log pi_ref)`
    over y's tokens and `s(y)` its reward mapped to [0, 1] (`lp.rewards`); the mean over the
    scored samples (a NaN reward is left out; none scored: a zero loss). `reference="init"`:
    `pi_ref` is the starting model, `lp.ref_logp` (the paper's equation); `"rollout"`: `pi_ref`
    is pi_old, `lp.old_logp` (the authors' code, UNA-UFT `Mistral-online/una_peft.py`, compares
    with the log-probs of rollout time). On the same samples and scores it equals offline
    `una_score` (objectives/unpaired.py).
    """
    ref = lp.old_logp if reference == "rollout" else _reference(lp, "una_online")
    s = _rewards(lp)
    ok = ~torch.isnan(s)
    if not bool(ok.any()):
        return _zero(lp)
    r = lp.seq(lp.logp) - lp.seq(ref)
    return (torch.sigmoid(beta * r[ok]) - s[ok].to(r.dtype)).pow(2).mean()


def una_online_pair(lp: RolloutLogps, *, beta: float = 0.1) -> Tensor:
    """Pairwise online UNA (Wang et al. 2024, arXiv 2408.15339: the pairwise case, eq. 9 on a
    pair) on the best and worst sample of each group (`best_and_worst`).

    `(sigma(beta * (r(y+) - r(y-))) - sigma(R(y+) - R(y-)))^2`, `r` the summed log ratio to the
    reference (`lp.ref_logp`), `R` the reward as given (unmapped: `sigma(R+ - R-)` is the
    Bradley-Terry probability that y+ is preferred, as a reward model trained on pairs scores
    it); mean over pairs. A group whose scored rewards are all equal gives no pair (left out,
    `pairless_groups`); no pair in the batch: a zero loss. With a hard preference
    (`R+ - R- -> inf`) the gradient points where DPO's does.
    """
    ref = _reference(lp, "una_online_pair")
    R = _rewards(lp)
    best, worst = best_and_worst(R, lp.group_size)
    if best.numel() == 0:
        return _zero(lp)
    r = lp.seq(lp.logp) - lp.seq(ref)
    target = torch.sigmoid((R[best] - R[worst]).to(r.dtype))
    return (torch.sigmoid(beta * (r[best] - r[worst])) - target).pow(2).mean()


# ------------------------------------------------------------------------------ online DPO
def online_dpo(
    lp: RolloutLogps, *, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
) -> Tensor:
    """Online DPO (Guo et al. 2024, arXiv 2402.04792, "OAIF"; TRL `OnlineDPOTrainer`): offline
    `dpo` / `ipo` (objectives/preference.py) on pairs the policy sampled, y+ / y- the highest- and
    lowest-reward samples of each group (`best_and_worst`).

    `sigmoid`: `-logsigmoid(beta * (r(y+) - r(y-)))`; `ipo`: `(r(y+)/|y+| - r(y-)/|y-| -
    1/(2*beta))^2` (length-averaged as offline `ipo` and TRL's DPOTrainer; TRL's
    OnlineDPOTrainer uses the summed ratios there); `r` summed log ratio to the reference; mean
    over pairs. A group whose scored rewards are all equal gives no pair (left out, counted by
    `pairless_groups`; TRL takes the first sample as chosen); no pair: a zero loss.
    """
    ref = _reference(lp, "online_dpo")
    best, worst = best_and_worst(_rewards(lp), lp.group_size)
    if best.numel() == 0:
        return _zero(lp)
    pairs = PairLogps(_seq(lp, ref, best), _seq(lp, ref, worst))
    if loss_type == "ipo":
        return ipo(pairs, beta=beta)
    if loss_type != "sigmoid":
        raise ValueError(f"online_dpo: loss_type {loss_type!r} is not one of sigmoid, ipo")
    return dpo(pairs, beta=beta)


# ------------------------------------------------------------------------------ GRPO, RLOO
def _clipped(ratio: Tensor, adv: Tensor, epsilon: float, epsilon_high: float) -> Tensor:
    """PPO's clipped surrogate, negated: `-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)`."""
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)


def grpo(
    lp: RolloutLogps,
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo",
    scale_rewards: Literal["group", "batch", "none"] = "group",
    std_floor: float = 1e-4,
    kl_correction: bool = True,
) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, eq. 3), reduced as TRL 1.16
    `GRPOTrainer._compute_loss` (token-level importance ratio).

    Per token `l_t = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * k3_t`,
    `rho_t = pi_theta / pi_old`, `A = group_advantages(R, G, scale_rewards, std_floor)`,
    `k3_t = exp(lr_t) - lr_t - 1` with `lr_t = log pi_ref - log pi_theta` (Schulman's k3,
    eq. 4), multiplied by `rho_t` when `kl_correction` (TRL's `use_bias_correction_kl`, default
    on: the unbiased reverse-KL gradient, DeepSeek-V3.2 arXiv 2512.02556; its value at
    rho = 1 is unchanged, its gradient is not). Aggregation over the micro-batch's masked tokens:
    `dapo` (DAPO arXiv 2503.14476): token sum / `lp.num_items` (the whole generation batch's
    tokens per micro-batch and process; this batch's tokens when None); `bnpo`: token sum / this
    batch's tokens; `grpo`: token mean per sequence, then mean; `dr_grpo` (Dr. GRPO arXiv
    2503.20783): token sum / (N * max_new_tokens). On the first iteration `old_logp ==
    logp.detach()`, `rho = 1` and the loss is the policy gradient `-A * logp` aggregated.
    """
    if loss_type not in ("dapo", "grpo", "bnpo", "dr_grpo"):
        raise ValueError(f"grpo: loss_type {loss_type!r} is not one of dapo, grpo, bnpo, dr_grpo")
    m = lp.mask.to(lp.logp.dtype)
    logp, old = masked(lp.logp, m), masked(lp.old_logp.to(lp.logp.dtype), m)
    adv = group_advantages(_rewards(lp), lp.group_size, scale_rewards, std_floor, lp.batch_std)
    ratio = torch.exp(logp - old)
    per_token = _clipped(ratio, adv.to(logp.dtype)[:, None], epsilon, epsilon_high)
    if beta != 0.0:
        lr = masked(_reference(lp, "grpo").to(logp.dtype), m) - logp
        k3 = torch.exp(lr) - lr - 1
        per_token = per_token + beta * (k3 * ratio if kl_correction else k3)
    per_token = masked(per_token, m)
    if loss_type == "grpo":
        return (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return per_token.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return per_token.sum() / (per_token.shape[0] * lp.max_new_tokens)
    items = m.sum() if lp.num_items is None else torch.tensor(float(lp.num_items))
    return per_token.sum() / items.to(per_token).clamp(min=1.0)


def rloo(
    lp: RolloutLogps, *, beta: float = 0.05, epsilon: float = 0.2, epsilon_high: float = 0.2
) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740, eq. 4), as TRL 1.16 `RLOOTrainer`
    (`_generate_and_score_completions` for the advantages, `_compute_loss` for the loss).

    The KL is in the reward: `R_i = reward_i - beta * sum_t (log pi_old - log pi_ref)` (the
    first-order log ratio summed over y_i's tokens, from the rollout-time log-probs: no
    gradient); `A_i = leave_one_out_advantages(R, G)`. Sequence-level ratio
    `rho_i = exp(logp(y_i) - logp_old(y_i))` (summed log-probs); per sample
    `-min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i)`, mean over samples. On the
    first iteration `rho = 1`: the loss is `-mean A_i * logp(y_i)` in gradient (value `-mean A`).
    """
    m = lp.mask.to(lp.logp.dtype)
    seq, old = lp.seq(lp.logp), lp.seq(lp.old_logp.to(lp.logp.dtype))
    R = _rewards(lp).to(seq.dtype)
    if beta != 0.0:
        R = R - beta * (old - lp.seq(_reference(lp, "rloo").to(m.dtype))).detach()
    adv = leave_one_out_advantages(R, lp.group_size)
    return _clipped(torch.exp(seq - old.detach()), adv, epsilon, epsilon_high).mean()
