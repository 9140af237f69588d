"""The online objectives (objectives/online.py): hand-computed values on tiny tensors, the
importance ratio on the first iteration, masked tokens, NaN rewards and zero-std groups, online
UNA against offline `una_score`, and TRL 1.16's own code paths on identical inputs.

TRL comparisons call the real methods on objects built with `object.__new__` (no `__init__`,
no model), the attributes they read set by hand and the per-token log-prob pass replaced by a
function returning our leaf tensor, so that both sides' gradients reach the same leaf:

- `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py): the per-token clipped loss, the k3
  KL with and without `use_bias_correction_kl`, the aggregations dapo / grpo / bnpo / dr_grpo;
- `GRPOTrainer._generate_and_score_completions`: the group-normalised advantages
  (`scale_rewards` group / batch / none, unscorable completions, zero-std groups) and
  `frac_reward_zero_std`; generation and reward functions are replaced by their outputs;
- `RLOOTrainer._compute_loss` and `RLOOTrainer._generate_and_score_completions`
  (trl/trainer/rloo_trainer.py): the sequence-level clipped loss, the KL in the reward, the
  leave-one-out baseline;
- `OnlineDPOTrainer.training_step` (trl/experimental/online_dpo/online_dpo_trainer.py):
  `loss_type="sigmoid"` on pairs whose rewards differ (TRL takes the first of a tie as chosen; we
  leave a tie out). Its `"ipo"` sums the log ratios, ours length-averages them as offline `ipo`
  (METHODS.md: "ipo as offline"), so IPO is checked against offline `ipo` instead.

TRL has no online UNA; `una_online` is checked against offline `una_score`.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from unitune.objectives import (
    REGISTRY,
    FeedbackLogps,
    PairLogps,
    RolloutLogps,
    SeqLogps,
    best_and_worst,
    group_advantages,
    leave_one_out_advantages,
    pairless_groups,
    register,
    zero_std_groups,
)
from unitune.objectives.online import grpo, online_dpo, rloo, una_online, una_online_pair
from unitune.objectives.preference import dpo, ipo
from unitune.objectives.unpaired import una_score

D = torch.float64
NAN = math.nan
ONLINE = ("una_online", "una_online_pair", "online_dpo", "grpo", "rloo")
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


def rollout(seed, groups, G, T=6, *, off_policy=0.0, rewards=None, **kw) -> RolloutLogps:
    """Random completions of `groups` prompts x G samples, right-padded to T; `logp` a leaf with
    zeros where masked; `old_logp` equal to `logp` (first iteration) or shifted by `off_policy`."""
    g = torch.Generator().manual_seed(seed)
    n = groups * G
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(D)
    logp = ((-torch.rand(n, T, generator=g, dtype=D) * 3 - 0.01) * mask).requires_grad_(True)
    old = logp.detach() + off_policy * torch.randn(n, T, generator=g, dtype=D) * mask
    ref = (-torch.rand(n, T, generator=g, dtype=D) * 3 - 0.01) * mask
    r = torch.randn(n, generator=g, dtype=D) if rewards is None else torch.tensor(rewards, dtype=D)
    return RolloutLogps(logp, mask, old, ref, r, G, T, **kw)


def grad(loss, leaf):
    (out,) = torch.autograd.grad(loss, leaf)
    return out


def seqs(lp):
    """Per-sample summed log-probs under the policy, pi_old and the reference."""
    m = lp.mask
    return (lp.logp * m).sum(1), (lp.old_logp * m).sum(1), (lp.ref_logp * m).sum(1)


# ------------------------------------------------------------------------------ helpers by hand
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, NAN, 3.0, NAN, 5.0, NAN], dtype=D)
    s2 = 1 / math.sqrt(2)  # (1 - 2) / std([1, 3]) with Bessel's correction
    torch.testing.assert_close(
        group_advantages(r, 3),
        torch.tensor([-1, 0, 1, 0, 0, 0, -s2, 0, s2, 0, 0, 0], dtype=D),
    )
    torch.testing.assert_close(
        group_advantages(r, 3, "none"),
        torch.tensor([-1, 0, 1, 0, 0, 0, -1, 0, 1, 0, 0, 0], dtype=D),
    )
    torch.testing.assert_close(
        group_advantages(r, 3, "batch", batch_std=2.0),
        torch.tensor([-1, 0, 1, 0, 0, 0, -1, 0, 1, 0, 0, 0], dtype=D) / 2,
    )
    # batch without a given std: the std of these rewards (scored ones, Bessel)
    finite = r[~torch.isnan(r)]
    torch.testing.assert_close(
        group_advantages(r, 3, "batch"), group_advantages(r, 3, "none") / finite.std()
    )
    # the floor: a group of std 1e-6 * sqrt(2) / 2 is divided by 1e-4, not by its std
    tiny = torch.tensor([0.0, 1e-6], dtype=D)
    torch.testing.assert_close(group_advantages(tiny, 2), torch.tensor([-5e-3, 5e-3], dtype=D))
    torch.testing.assert_close(
        group_advantages(tiny, 2, std_floor=1e-8), torch.tensor([-s2, s2], dtype=D)
    )
    with pytest.raises(ValueError, match="group_advantages: 5 samples are not whole groups of 2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale_rewards: 'rank'"):
        group_advantages(r, 3, "rank")


def test_zero_std_pairless_groups_and_the_pairs_by_hand():
    r = torch.tensor(
        [1, 1, 1, 1, 2, 3, NAN, 4, 4, NAN, NAN, 4, NAN, NAN, NAN, 2, 7, 7, 9, 9, 5], dtype=D
    )
    # zero std: groups 0 and 2 (two or more scored, all equal); group 3 has one scored sample
    assert zero_std_groups(r, 3) == 2
    assert pairless_groups(r, 3) == 4  # groups 0, 2, 3, 4
    best, worst = best_and_worst(r, 3)
    assert best.tolist() == [5, 16, 18]  # ties for the best go to the first: 16 over 17
    assert worst.tolist() == [3, 15, 20]
    assert zero_std_groups(torch.tensor([1.0, 2.0]), 1) == 0  # G = 1: no group to compare


def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 1.0, NAN, 3.0, NAN, 4.0, NAN], dtype=D)
    torch.testing.assert_close(
        leave_one_out_advantages(r, 3),
        torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 1 - 3, 0, 3 - 1, 0, 0, 0], dtype=D),
    )


# ------------------------------------------------------------------------------ losses by hand
def tiny(rewards, G, *, old=None, ref=None, logp=None, **kw) -> RolloutLogps:
    """Two or four samples of three token slots; row i has i % 3 + 1 tokens."""
    n = len(rewards)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=D)[:n]
    if logp is None:
        logp = torch.tensor([[-1.0, -2, -0.5], [-0.5, 0, 0], [-1, -1, 0], [-0.2, -0.3, -0.4]])
    logp = (logp[:n].to(D) * mask).requires_grad_(True)
    old = logp.detach() if old is None else torch.tensor(old, dtype=D)[:n] * mask
    ref = torch.tensor([[-2.0, -1, -1], [-1, 0, 0], [-0.5, -0.5, 0], [-0.2, -0.3, -0.4]])
    ref = ref[:n].to(D) * mask if ref is not None else None
    return RolloutLogps(logp, mask, old, ref, torch.tensor(rewards, dtype=D), G, 3, **kw)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_una_online_by_hand():
    # r = sum(logp - ref) = [-3.5 + 4, -0.5 + 1, -2 + 1, 0] = [0.5, 0.5, -1, 0]
    lp = tiny([0.9, NAN, 0.2, 0.5], 1)
    want = ((sig(0.5 * 0.5) - 0.9) ** 2 + (sig(-0.5) - 0.2) ** 2 + (0.5 - 0.5) ** 2) / 3
    assert una_online(lp, beta=0.5).item() == pytest.approx(want, rel=1e-12)
    # reference "rollout": pi_ref is pi_old (here the policy itself: r = 0 in value)
    assert una_online(lp, beta=0.5, reference="rollout").item() == pytest.approx(
        ((0.5 - 0.9) ** 2 + (0.5 - 0.2) ** 2 + (0.5 - 0.5) ** 2) / 3, rel=1e-12
    )
    # ...but not in gradient: d/dlogp (sigma(b r) - s)^2 = 2 (sigma - s) sigma (1 - sigma) b
    g = grad(una_online(lp, beta=0.5, reference="rollout"), lp.logp)
    per = torch.tensor([2 * (0.5 - s) * 0.25 * 0.5 / 3 for s in (0.9, 0.0, 0.2, 0.5)], dtype=D)
    per[1] = 0.0  # NaN reward: left out
    torch.testing.assert_close(g, per[:, None] * lp.mask)


def test_una_online_pair_by_hand():
    # groups of two: rows (0, 1) rewards 2 > -1, rows (2, 3) rewards 0.5 < 3
    lp = tiny([2.0, -1.0, 0.5, 3.0], 2)
    r = [0.5, 0.5, -1.0, 0.0]
    want = (
        (sig(0.1 * (r[0] - r[1])) - sig(3.0)) ** 2 + (sig(0.1 * (r[3] - r[2])) - sig(2.5)) ** 2
    ) / 2
    assert una_online_pair(lp).item() == pytest.approx(want, rel=1e-12)
    # a tie gives no pair: only the second group counts
    lp = tiny([1.0, 1.0, 0.5, 3.0], 2)
    assert una_online_pair(lp).item() == pytest.approx(
        (sig(0.1 * (r[3] - r[2])) - sig(2.5)) ** 2, rel=1e-12
    )


def test_online_dpo_by_hand_and_as_offline_dpo_and_ipo():
    lp = tiny([2.0, -1.0, 0.5, 3.0], 2)
    r, n = [0.5, 0.5, -1.0, 0.0], [3, 1, 2, 3]
    m1, m2 = r[0] - r[1], r[3] - r[2]
    want = (-math.log(sig(0.1 * m1)) - math.log(sig(0.1 * m2))) / 2
    assert online_dpo(lp).item() == pytest.approx(want, rel=1e-12)
    h1, h2 = r[0] / n[0] - r[1] / n[1], r[3] / n[3] - r[2] / n[2]
    want = ((h1 - 5) ** 2 + (h2 - 5) ** 2) / 2
    assert online_dpo(lp, loss_type="ipo").item() == pytest.approx(want, rel=1e-12)
    # = the offline losses on the pairs (best, worst) = (0, 1), (3, 2)
    logp, _, ref = seqs(lp)
    ln = lp.mask.sum(1)
    w, lo = torch.tensor([0, 3]), torch.tensor([1, 2])
    pairs = PairLogps(SeqLogps(logp[w], ln[w], ref[w]), SeqLogps(logp[lo], ln[lo], ref[lo]))
    for beta in (0.1, 0.7):
        torch.testing.assert_close(online_dpo(lp, beta=beta), dpo(pairs, beta=beta))
        torch.testing.assert_close(
            online_dpo(lp, beta=beta, loss_type="ipo"), ipo(pairs, beta=beta)
        )


def test_grpo_aggregations_clipping_and_kl_by_hand():
    # one group of two: rewards (1, 0) -> A = +-0.5 / std = +-1/sqrt(2); |y| = 3 and 1
    a = 1 / math.sqrt(2)
    lp = tiny([1.0, 0.0], 2)
    # first iteration: rho = 1, per-token loss -A
    assert grpo(lp, loss_type="dapo").item() == pytest.approx((-3 * a + a) / 4, rel=1e-12)
    assert grpo(lp, loss_type="bnpo").item() == pytest.approx((-3 * a + a) / 4, rel=1e-12)
    assert grpo(lp, loss_type="grpo").item() == pytest.approx(0.0, abs=1e-15)
    assert grpo(lp, loss_type="dr_grpo").item() == pytest.approx((-3 * a + a) / 6, rel=1e-12)
    lp.num_items = 10.0  # the generation batch's tokens per micro-batch
    assert grpo(lp, loss_type="dapo").item() == pytest.approx((-3 * a + a) / 10, rel=1e-12)
    assert grpo(lp, loss_type="bnpo").item() == pytest.approx((-3 * a + a) / 4, rel=1e-12)
    # off-policy: row 0 (A > 0) ratios 1.5, 0.5, 1.0; row 1 (A < 0) ratio 0.5
    old = [[math.log(1 / 1.5) - 1, -2 - math.log(0.5), -0.5], [-0.5 - math.log(0.5), 0, 0]]
    lp = tiny([1.0, 0.0], 2, old=old)
    tokens = [-1.2 * a, -0.5 * a, -1.0 * a, 0.8 * a]  # clip(1.5) = 1.2; min(0.5A, 0.8A) etc.
    assert grpo(lp, loss_type="bnpo").item() == pytest.approx(sum(tokens) / 4, rel=1e-12)
    tokens[0] = -1.5 * a  # epsilon_high 0.6: 1.5 is inside the clip range
    assert grpo(lp, loss_type="bnpo", epsilon_high=0.6).item() == pytest.approx(
        sum(tokens) / 4, rel=1e-12
    )
    # the k3 KL (first iteration): lr = ref - logp = [-1, 1, -0.5], [-0.5]
    lp = tiny([1.0, 0.0], 2)
    k3 = [math.exp(x) - x - 1 for x in (-1, 1, -0.5, -0.5)]
    want = (-3 * a + a + 0.04 * sum(k3)) / 4
    for correction in (True, False):  # its value at rho = 1 does not depend on the correction
        loss = grpo(lp, beta=0.04, kl_correction=correction)
        assert loss.item() == pytest.approx(want, rel=1e-12)
    # gradient: d k3 / d logp = 1 - exp(lr); with the correction k3 * rho adds k3
    g_plain = grad(grpo(lp, beta=0.04, kl_correction=False), lp.logp)
    g_corr = grad(grpo(lp, beta=0.04), lp.logp)
    lr = (lp.ref_logp - lp.logp.detach()) * lp.mask
    kl = (torch.exp(lr) - lr - 1) * lp.mask
    torch.testing.assert_close(g_corr - g_plain, 0.04 * kl / 4)
    assert zero_std_groups(lp.rewards, 2) == 0
    with pytest.raises(ValueError, match="grpo: needs reference log-probs"):
        grpo(RolloutLogps(lp.logp, lp.mask, lp.old_logp, None, lp.rewards, 2, 3), beta=0.1)


def test_rloo_by_hand():
    # KL in the reward: sum(old - ref) = sum(logp - ref) at the first iteration = [0.5, 0.5]
    lp = tiny([1.0, 0.0], 2)
    R = [1.0 - 0.05 * 0.5, 0.0 - 0.05 * 0.5]
    A = [R[0] - R[1], R[1] - R[0]]
    assert rloo(lp).item() == pytest.approx(-(A[0] + A[1]) / 2, abs=1e-15)
    g = grad(rloo(lp), lp.logp)
    torch.testing.assert_close(g, -torch.tensor(A, dtype=D)[:, None] * lp.mask / 2)
    # off-policy: sequence ratios exp(-0.7) ~ 0.50 (row 0) and exp(0.4) ~ 1.49 (row 1)
    old = [[-1 + 0.7, -2, -0.5], [-0.5 - 0.4, 0, 0]]
    kl = [(0.7 - 3.5) + 4, (-0.9) + 1]  # sum(old) - sum(ref)
    lp = tiny([1.0, 0.0], 2, old=old)
    a = (1.0 - 0.05 * kl[0]) - (0.0 - 0.05 * kl[1])  # A = (a, -a)
    # row 0: min(0.50 a, 0.8 a) = 0.50 a; row 1: -min(-1.49 a, -1.2 a) = 1.49 a: unclipped
    want = (-math.exp(-0.7) * a + math.exp(0.4) * a) / 2
    assert rloo(lp).item() == pytest.approx(want, rel=1e-12)
    lp = tiny([0.0, 1.0], 2, old=old)
    a = (1.0 - 0.05 * kl[1]) - (0.0 - 0.05 * kl[0])  # A = (-a, a): both ratios clipped
    assert rloo(lp).item() == pytest.approx((0.8 * a - 1.2 * a) / 2, rel=1e-12)
    assert rloo(lp, epsilon=0.6, epsilon_high=0.6).item() == pytest.approx(
        (math.exp(-0.7) * a - math.exp(0.4) * a) / 2, rel=1e-12
    )


# ------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_first_iteration_ratio_is_one_grpo_is_the_policy_gradient(loss_type):
    lp = rollout(1, 3, 4, num_items=11.0)
    adv = group_advantages(lp.rewards, 4)
    loss = grpo(lp, loss_type=loss_type)
    m = lp.mask
    per_token = -adv[:, None] * m  # the un-clipped form at rho = 1
    norm = {
        "dapo": torch.tensor(11.0, dtype=D),
        "bnpo": m.sum(),
        "dr_grpo": torch.tensor(12.0 * 6, dtype=D),
    }
    if loss_type == "grpo":
        weights = m / m.sum(1, keepdim=True) / 12
    else:
        weights = m / norm[loss_type]
    torch.testing.assert_close(loss, (per_token * weights).sum())
    # gradient: -A_i * d logp_t, aggregated with the same weights
    torch.testing.assert_close(grad(loss, lp.logp), -adv[:, None] * weights)
    ratio = torch.exp(lp.logp - lp.old_logp)
    assert torch.equal(ratio, torch.ones_like(ratio))


def test_first_iteration_ratio_is_one_rloo_is_the_policy_gradient():
    lp = rollout(2, 3, 4)
    _, old, ref = seqs(lp)
    adv = leave_one_out_advantages(lp.rewards - 0.05 * (old - ref), 4)
    loss = rloo(lp)
    torch.testing.assert_close(loss, -adv.mean())
    torch.testing.assert_close(grad(loss, lp.logp), -adv[:, None] * lp.mask / 12)


@pytest.mark.parametrize("name", ONLINE)
def test_masked_tokens_never_reach_the_loss(name):
    """Whatever the positions after EOS (and padding) hold, in the policy's, pi_old's or the
    reference's log-probs: the same loss, the same gradient, zero gradient there."""
    G = REGISTRY[name].generations or 2
    obj = REGISTRY[name]
    params = obj.params(**({"beta": 0.1} if name == "grpo" else {}))
    for off in (0.0, 0.3):
        lp = rollout(3, 3, max(G, 2), off_policy=off)
        clean = obj.loss(lp, params)
        g_clean = grad(clean, lp.logp)
        junk = torch.tensor([1e4, -math.inf, math.nan, 37.0], dtype=D).repeat(lp.mask.numel())
        fill = junk[: lp.mask.numel()].view_as(lp.mask)
        out = lp.mask == 0
        assert out.any()
        dirty = torch.where(out, fill, lp.logp.detach()).requires_grad_(True)
        lp2 = RolloutLogps(
            dirty, lp.mask, torch.where(out, fill.flip(0), lp.old_logp),
            torch.where(out, fill.flip(1), lp.ref_logp), lp.rewards, lp.group_size,
            lp.max_new_tokens,
        )  # fmt: skip
        loss = obj.loss(lp2, params)
        torch.testing.assert_close(loss, clean)
        g = grad(loss, dirty)
        assert torch.isfinite(g).all() and (g[out] == 0).all()
        torch.testing.assert_close(g, g_clean)


@pytest.mark.parametrize("name", ONLINE)
def test_all_rewards_nan_give_a_zero_loss_that_still_has_a_graph(name):
    """No sample scored: loss 0 with zero gradient, and `backward` works (the step goes on)."""
    obj = REGISTRY[name]
    G = max(obj.generations or 2, 2)
    lp = rollout(4, 3, G)
    every = RolloutLogps(*[getattr(lp, f) for f in ("logp", "mask", "old_logp", "ref_logp")],
                         torch.full_like(lp.rewards, NAN), G, 6)  # fmt: skip
    loss = obj.loss(every)
    assert loss.item() == 0.0 and loss.requires_grad
    assert (grad(loss, lp.logp) == 0).all()
    assert loss.grad_fn is not None


def test_nan_rewards_in_each_objective():
    # una_online: a NaN sample is dropped from the mean
    lp = rollout(5, 4, 1)
    lp.rewards = torch.sigmoid(lp.rewards)
    keep = torch.tensor([0, 2, 3])
    lp.rewards[1] = NAN
    logp, _, ref = seqs(lp)
    n = lp.mask.sum(1)
    fb = FeedbackLogps(SeqLogps(logp[keep], n[keep], ref[keep]), lp.rewards[keep])
    torch.testing.assert_close(una_online(lp), una_score(fb))
    # grpo: a NaN sample gets advantage 0 and leaves the group's statistics; its tokens still
    # count in the normaliser (TRL)
    lp = rollout(6, 2, 3, rewards=[1.0, NAN, 3.0, 2.0, 2.0, 5.0])
    adv = group_advantages(lp.rewards, 3)
    assert adv[1] == 0 and adv[0] == -adv[2]
    torch.testing.assert_close(
        grpo(lp, loss_type="bnpo"), (-adv[:, None] * lp.mask).sum() / lp.mask.sum()
    )
    # online_dpo: the NaN sample is never the best or the worst
    lp = rollout(7, 2, 3, rewards=[1.0, NAN, 0.0, NAN, NAN, 4.0])
    best, worst = best_and_worst(lp.rewards, 3)
    assert best.tolist() == [0] and worst.tolist() == [2]
    logp, _, ref = seqs(lp)
    n = lp.mask.sum(1)
    pairs = PairLogps(SeqLogps(logp[:1], n[:1], ref[:1]), SeqLogps(logp[2:3], n[2:3], ref[2:3]))
    torch.testing.assert_close(online_dpo(lp), dpo(pairs))


def test_zero_std_groups_give_grpo_and_rloo_no_signal():
    lp = rollout(8, 2, 4, rewards=[0.5] * 4 + [1.0, 0.0, 0.0, 1.0])
    assert zero_std_groups(lp.rewards, 4) == 1
    g = grad(grpo(lp, loss_type="grpo"), lp.logp)
    assert (g[:4] == 0).all() and (g[4:] != 0).any()
    g = grad(rloo(lp, beta=0.0), lp.logp)
    assert (g[:4] == 0).all() and (g[4:] != 0).any()
    # online pairs: the equal group gives none
    assert pairless_groups(lp.rewards, 4) == 1
    assert best_and_worst(lp.rewards, 4)[0].tolist() == [4]


def test_una_online_equals_offline_una_score_on_the_same_records():
    """The policy's samples with their [0, 1] scores as unpaired score records: the same loss and
    gradient (summed log ratios against the starting model, `reference: init`)."""
    lp = rollout(9, 8, 1)
    lp.rewards = torch.rand(8, generator=torch.Generator().manual_seed(9), dtype=D)
    for beta in (0.03, 0.5):
        logp, _, ref = seqs(lp)
        fb = FeedbackLogps(SeqLogps(logp, lp.mask.sum(1), ref), lp.rewards)
        ours = REGISTRY["una_online"].loss(lp, REGISTRY["una_online"].params(beta=beta))
        offline = REGISTRY["una_score"].loss(fb, REGISTRY["una_score"].params(beta=beta))
        torch.testing.assert_close(ours, offline)
        torch.testing.assert_close(grad(ours, lp.logp), grad(offline, lp.logp))
    assert REGISTRY["una_online"].defaults == {"beta": 0.03, "reference": "init"}


def test_the_registry_facts_of_the_online_objectives():
    facts = {n: (REGISTRY[n].slot, REGISTRY[n].data, REGISTRY[n].generations) for n in ONLINE}
    assert facts == {
        "una_online": ("pref", "prompts", 1),
        "una_online_pair": ("pref", "prompts", 2),
        "online_dpo": ("pref", "prompts", 2),
        "grpo": ("pref", "prompts", 8),
        "rloo": ("pref", "prompts", 2),
    }
    assert [n for n in ONLINE if REGISTRY[n].min_generations > 1] == list(ONLINE[1:])
    assert [n for n in ONLINE if REGISTRY[n].unit_rewards] == ["una_online"]
    assert all(REGISTRY[n].generations is None for n in REGISTRY if n not in ONLINE)
    d = REGISTRY["grpo"].defaults
    assert (d["beta"], d["epsilon"], d["epsilon_high"], d["loss_type"]) == (0.0, 0.2, 0.2, "dapo")
    assert (d["scale_rewards"], d["std_floor"]) == ("group", 1e-4)
    assert REGISTRY["rloo"].defaults["beta"] == 0.05
    assert REGISTRY["online_dpo"].defaults == {"beta": 0.1, "loss_type": "sigmoid"}
    with pytest.raises(ValueError):
        REGISTRY["grpo"].params(loss_type="ppo")
    try:
        with pytest.raises(ValueError, match="generations"):
            register(una_online, name="offline_g", data="pairs", needs_ref=True, source="t",
                     generations=2)  # fmt: skip
        with pytest.raises(ValueError, match="generations"):
            register(una_online, name="online_g", data="prompts", needs_ref=True, source="t")
    finally:
        REGISTRY.pop("offline_g", None)
        REGISTRY.pop("online_g", None)


# ------------------------------------------------------------------------------ against TRL 1.16
trl = pytest.importorskip("trl")

from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

GA, SPG = 2, 4  # TRL's gradient_accumulation_steps and steps_per_generation in the stubs


def stub(cls, logps, **attrs):
    """`cls` without `__init__`: the attributes its methods read, and its per-token log-prob
    pass returning `logps[model]` (our leaf for the policy)."""
    obj = object.__new__(cls)
    model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    common = dict(
        model=model,
        accelerator=SimpleNamespace(
            device="cpu", num_processes=1, process_index=0, gather=lambda x: x,
            gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=GA,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
    )  # fmt: skip
    for k, v in {**common, **attrs}.items():
        setattr(obj, k, v)

    def per_token(m, *args, **kwargs):
        out = logps["policy" if m is model else m]
        return out, torch.zeros_like(out.detach()), None

    obj._get_per_token_logps_and_entropies = per_token
    return obj


def trl_grpo_loss(lp, adv, *, beta, epsilon, epsilon_high, loss_type, correction, first):
    n, t = lp.mask.shape
    trainer = stub(
        GRPOTrainer, {},
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=epsilon, epsilon_high=epsilon_high, _entropy_bonus_enabled=False,
        max_completion_length=lp.max_new_tokens,
        args=SimpleNamespace(use_bias_correction_kl=correction, delta=None,
                             steps_per_generation=SPG),
    )  # fmt: skip
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp.logp, lp.logp * 0, None)
    inputs = dict(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, t, dtype=torch.long),
        completion_mask=lp.mask.long(),
        advantages=adv,
        num_items_in_batch=torch.tensor(lp.num_items * SPG),  # the generation batch's tokens
        ref_per_token_logps=lp.ref_logp,
    )
    if not first:  # TRL leaves pi_old out when it is the policy itself (logp.detach())
        inputs["old_per_token_logps"] = lp.old_logp
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [0.0, 0.4])
def test_grpo_agrees_with_trl_grpo_compute_loss(loss_type, beta, off_policy):
    """`GRPOTrainer._compute_loss` on the same per-token log-probs, pi_old, reference and
    advantages (ours: `group_advantages`): TRL's loss is ours / gradient_accumulation_steps (the
    loop divides ours; TRL divides its own, dapo's through its normalizer), value and gradient."""
    for correction in (True, False):
        for eps, eps_high in ((0.2, 0.2), (0.1, 0.28)):
            lp = rollout(10 + int(off_policy * 10), 3, 4, off_policy=off_policy, num_items=20.0)
            adv = group_advantages(lp.rewards, 4)
            params = dict(beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type)
            ours = grpo(lp, kl_correction=correction, **params) / GA
            theirs = trl_grpo_loss(lp, adv, correction=correction, first=off_policy == 0, **params)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad(ours, lp.logp), grad(theirs, lp.logp))
            if off_policy:  # some ratios are outside the clip range on both sides
                ratio = torch.exp(lp.logp - lp.old_logp)[lp.mask.bool()]
                assert (ratio > 1 + eps_high).any() and (ratio < 1 - eps).any()


def trl_generation(cls, rewards, G, logps, **attrs):
    """`cls._generate_and_score_completions` with generation and reward functions replaced by
    their outputs (`rewards`: one reward function, NaN = it returned None): TRL's advantages."""
    n, t = logps["policy"].shape
    g = torch.Generator().manual_seed(n)
    lengths = [int(x) for x in torch.randint(1, t + 1, (n,), generator=g)]
    lengths[0] = t
    ids, texts = [[5] * k for k in lengths], [f"c{i}" for i in range(n)]
    if cls is GRPOTrainer:  # with tool masks, sampling log-probs, extra fields, images
        generated = ([[1, 2]] * n, ids, None, texts, None, {}, None, None)
    else:
        generated = ([[1, 2]] * n, ids, texts)
    trainer = stub(
        cls, logps,
        _generate=lambda prompts: generated,
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None,
        mask_truncated_completions=False, num_generations=G, num_iterations=1,
        args=SimpleNamespace(per_device_train_batch_size=n, gradient_checkpointing_kwargs=None,
                             steps_per_generation=1, gradient_accumulation_steps=1),
        _calculate_rewards=lambda *a: rewards[:, None].clone(),
        reward_weights=torch.ones(1, dtype=D), reward_func_names=["r"],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list),
               "advantages": [], "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        **attrs,
    )  # fmt: skip
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).to(D)
    return trainer, trainer._generate_and_score_completions([{"prompt": "p"}] * n), mask


GRPO_GEN = dict(environment_factories=None, tools=None, environments=None, beta=0.0,
                multi_objective_aggregation="sum_then_normalize")  # fmt: skip


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_agree_with_trl_grpo(scale):
    """`GRPOTrainer._generate_and_score_completions`'s advantages and `frac_reward_zero_std`:
    NaN (unscorable) rewards, a zero-std group, a group with one scored sample. TRL divides by
    `std + 1e-4`, we by `max(std, 1e-4)` (METHODS.md): equal times those divisors, and within
    1e-4 / std of each other."""
    G = 4
    r = torch.tensor([1.0, 2.0, 0.5, 4.0, 3.0, 3.0, 3.0, 3.0, 0.2, NAN, 0.9, 0.1,
                      NAN, NAN, 7.0, NAN, -1.0, 2.0, 2.5, 0.0], dtype=D)  # fmt: skip
    logp = torch.zeros(len(r), 5, dtype=D)
    trainer, out, _ = trl_generation(GRPOTrainer, r, G, {"policy": logp}, scale_rewards=scale,
                                     **GRPO_GEN)  # fmt: skip
    theirs = out["advantages"]
    finite = r[~torch.isnan(r)]
    batch_std = float(finite.std())
    ours = group_advantages(r, G, scale, batch_std=batch_std if scale == "batch" else None)
    if scale == "none":
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    else:
        g = r.view(-1, G)
        std = torch.tensor(
            [float(x[~torch.isnan(x)].std()) if (~torch.isnan(x)).sum() > 1 else 0.0 for x in g],
            dtype=D,
        ).repeat_interleave(G)
        if scale == "batch":
            std = torch.full_like(std, batch_std)
        torch.testing.assert_close(ours * std.clamp(min=1e-4), theirs * (std + 1e-4))
        torch.testing.assert_close(ours, theirs, rtol=1e-4 / 0.3, atol=0)
    assert (ours[torch.isnan(r)] == 0).all() and (theirs[torch.isnan(r)] == 0).all()
    # the 3.0 group: zero std, advantage 0; the NaN-NaN-7-NaN group: one scored sample, 0
    assert (ours[4:8] == 0).all() and (ours[12:16] == 0).all()
    frac = trainer._metrics["train"]["frac_reward_zero_std"][-1]
    if scale != "batch":  # TRL logs zero std of the std it divides by (batch: the batch's)
        assert zero_std_groups(r, G) / (len(r) // G) == pytest.approx(frac)


def trl_rloo_loss(lp, adv, *, epsilon, epsilon_high):
    n, t = lp.mask.shape
    trainer = stub(RLOOTrainer, {}, epsilon_low=epsilon, epsilon_high=epsilon_high)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp.logp, lp.logp * 0, None)
    inputs = dict(
        prompt_ids=torch.zeros(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.zeros(n, t, dtype=torch.long),
        completion_mask=lp.mask.long(),
        old_logps=(lp.old_logp * lp.mask).sum(1),
        advantages=adv,
    )
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("off_policy", [0.0, 0.3])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.28)])
def test_rloo_agrees_with_trl_rloo(off_policy, eps):
    """`RLOOTrainer._generate_and_score_completions` (KL from pi_old in the reward, leave-one-out
    baseline, unscorable samples) and `RLOOTrainer._compute_loss` (clipped sequence ratio, mean
    over samples; the HF Trainer divides by accumulation as our loop does): value and
    gradient."""
    G, beta = 4, 0.05
    r = [1.0, 2.0, 0.5, 4.0, 3.0, NAN, 3.0, 1.0, NAN, NAN, 7.0, NAN]
    lp = rollout(20 + int(off_policy * 10), 3, G, T=5, off_policy=off_policy, rewards=r)
    _, out, mask = trl_generation(
        RLOOTrainer, lp.rewards, G, {"policy": lp.old_logp, "ref": lp.ref_logp}, beta=beta,
        ref_model="ref", reward_clip_range=None, normalize_advantages=False,
    )  # fmt: skip
    # TRL's completion mask comes from the generated lengths; give ours the same
    lp = RolloutLogps(
        (lp.logp.detach() * mask).requires_grad_(True), mask, lp.old_logp * mask,
        lp.ref_logp * mask, lp.rewards, G, 5,
    )  # fmt: skip
    _, old, ref = seqs(lp)
    adv = leave_one_out_advantages(lp.rewards - beta * (old - ref), G)
    torch.testing.assert_close(adv, out["advantages"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["old_logps"], old)
    ours = rloo(lp, beta=beta, epsilon=eps[0], epsilon_high=eps[1])
    theirs = trl_rloo_loss(lp, out["advantages"], epsilon=eps[0], epsilon_high=eps[1])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(ours, lp.logp), grad(theirs, lp.logp))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_online_dpo_agrees_with_trl_online_dpo_training_step(beta):
    """`OnlineDPOTrainer.training_step` (`loss_type="sigmoid"`, two samples per prompt, rewards
    that differ within each pair; generation, the reference pass and the reward functions
    replaced by their outputs; the loss caught at `accelerator.backward`): value and gradient.
    TRL lays a batch out as [first samples; second samples], we as groups: rows 2i, 2i + 1."""
    b, t = 5, 6
    lp = rollout(30, b, 2, T=t)
    order = torch.cat([torch.arange(0, 2 * b, 2), torch.arange(1, 2 * b, 2)])  # TRL's rows
    caught = {}
    trainer = stub(
        OnlineDPOTrainer, {},
        _beta=beta, eos_token_ids=[0], ref_model="ref", reward_funcs=["r"],
        stats=defaultdict(list), state=SimpleNamespace(epoch=0, global_step=1),
        processing_class=SimpleNamespace(batch_decode=lambda ids, **k: ["c"] * len(ids)),
        args=SimpleNamespace(use_vllm=False, missing_eos_penalty=None, loss_type="sigmoid",
                             torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                             gradient_accumulation_steps=1),
        _generate=lambda model, prompts, images=None: (
            torch.zeros(2 * b, 2, dtype=torch.long), torch.ones(2 * b, 2, dtype=torch.long),
            torch.ones(2 * b, t, dtype=torch.long), lp.mask[order].long(), None),
        _forward=lambda model, *a: lp.ref_logp[order] if model == "ref" else lp.logp[order],
        _calculate_rewards_from_functions=lambda **k: lp.rewards[order].clone(),
    )  # fmt: skip
    trainer.model.train = lambda: None
    trainer.accelerator.backward = lambda loss, **k: caught.setdefault("loss", loss)
    trainer.training_step(trainer.model, {"prompt": ["p"] * b})
    theirs = caught["loss"]
    ours = online_dpo(lp, beta=beta)
    assert pairless_groups(lp.rewards, 2) == 0
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(ours, lp.logp), grad(theirs, lp.logp))
