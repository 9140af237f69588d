"""The SFT-family, preference and unpaired objectives: hand-computed values and identities.

Expected values are computed here with `math`, independently of the torch code under test.
"""

import math
from functools import partial

import pytest
import torch

from unitune.objectives import REGISTRY, FeedbackLogps, PairLogps, SeqLogps

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def seq(logp, ref=None, n=None):
    n = n if n is not None else [1] * len(logp)
    return SeqLogps(t(logp), torch.tensor(n), None if ref is None else t(ref))


def pair(pc, rc, pr, rr, nc=None, nr=None):
    """policy/ref log-probs of chosen, then of rejected."""
    return PairLogps(seq(pc, rc, nc), seq(pr, rr, nr))


def loss(name, lp, **params):
    obj = REGISTRY[name]
    return obj.loss(lp, obj.params(**params)).item()


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- SFT family


def test_minor_sft_hand_computed():
    # r = (-4 - -5, -9 - -6) = (1, -3); |y| = (2, 3); beta = 0.5
    lp = seq([-4.0, -9.0], [-5.0, -6.0], [2, 3])
    expected = (-(2 / (0.5 * 2)) * logsig(0.5 * 1) - (2 / (0.5 * 3)) * logsig(0.5 * -3)) / 2
    assert loss("minor_sft", lp, beta=0.5) == pytest.approx(expected, rel=1e-12)
    # TorchRL's variant: normalised inside the sigmoid, same 2/beta scale
    expected_ln = (-(2 / 0.5) * logsig(0.5 * 1 / 2) - (2 / 0.5) * logsig(0.5 * -3 / 3)) / 2
    assert loss("minor_sft", lp, beta=0.5, length_normalize=True) == pytest.approx(expected_ln)
    assert expected_ln != pytest.approx(expected)


def test_minor_sft_at_reference_is_2log2_over_beta_per_token():
    lp = seq([-4.0, -9.0], [-4.0, -9.0], [2, 4])
    beta = 0.1
    expected = (2 * math.log(2) / (beta * 2) + 2 * math.log(2) / (beta * 4)) / 2
    assert loss("minor_sft", lp, beta=beta) == pytest.approx(expected)


def _grad(fn, logp, n, ref=None):
    x = logp.clone().requires_grad_(True)
    fn(SeqLogps(x, n, ref)).backward()
    return x.grad


def test_minor_sft_gradient_equals_sft_at_reference():
    torch.manual_seed(0)
    logp = -torch.rand(5, dtype=D) * 20
    n = torch.tensor([3, 7, 1, 12, 5])
    for beta in (0.1, 1.0):
        for ln in (False, True):
            params = REGISTRY["minor_sft"].params(beta=beta, length_normalize=ln)
            g = _grad(partial(REGISTRY["minor_sft"].loss, params=params), logp, n, logp.clone())
            # the sequence mean of per-sequence token-mean NLL: mean_i -logp_i / |y_i|
            g_seq_mean = _grad(lambda s: (-s.logp / s.n_tokens).mean(), logp, n)
            torch.testing.assert_close(g, g_seq_mean)
            torch.testing.assert_close(g, -1 / (n.to(D) * len(n)))
    # away from the reference the gradient is damped by 2 * sigma(-beta * r) < 1 when r > 0
    params = REGISTRY["minor_sft"].params(beta=1.0)
    g = _grad(partial(REGISTRY["minor_sft"].loss, params=params), logp, n, logp - 1.0)
    torch.testing.assert_close(g, -(2 / n.to(D)) * sig(-1.0) / len(n))


def test_minor_sft_equals_sft_gradient_only_when_lengths_are_equal():
    logp = t([-3.0, -8.0, -5.0])
    sft, minor = REGISTRY["sft"], REGISTRY["minor_sft"]
    same = torch.tensor([4, 4, 4])
    g_minor = _grad(minor.loss, logp, same, logp.clone())
    torch.testing.assert_close(g_minor, _grad(sft.loss, logp, same))
    torch.testing.assert_close(g_minor, torch.full((3,), -1 / 12, dtype=D))
    diff = torch.tensor([2, 4, 6])
    g_minor = _grad(minor.loss, logp, diff, logp.clone())
    g_sft = _grad(sft.loss, logp, diff)  # batch token mean: -1/12 for every sequence
    torch.testing.assert_close(g_sft, torch.full((3,), -1 / 12, dtype=D))
    assert not torch.allclose(g_minor, g_sft)


def test_uft_hand_computed():
    lp = seq([-4.0, -9.0], [-5.0, -6.0], [2, 3])  # r = 1, -3
    expected = ((sig(0.2 * 1) - 1) ** 2 + (sig(0.2 * -3) - 1) ** 2) / 2
    assert loss("uft", lp, beta=0.2) == pytest.approx(expected, rel=1e-12)
    assert loss("uft", seq([-2.0], [-2.0])) == pytest.approx(0.25)
    assert REGISTRY["uft"].defaults == {"beta": 0.01}


def test_sft_family_needs_reference():
    lp = seq([-4.0], None, [2])
    for name in ("minor_sft", "uft"):
        assert REGISTRY[name].needs_ref and REGISTRY[name].data == "demonstrations"
        with pytest.raises(ValueError, match="reference"):
            REGISTRY[name].loss(lp)


# ---------------------------------------------------------------- preference


def test_ipo_hand_computed_is_length_averaged():
    # r_w = -6 - -10 = 4 over 4 tokens -> 1; r_l = -3 - -2 = -1 over 2 tokens -> -0.5
    lp = pair([-6.0], [-10.0], [-3.0], [-2.0], nc=[4], nr=[2])
    beta = 0.5
    expected = (1 - (-0.5) - 1 / (2 * beta)) ** 2
    assert loss("ipo", lp, beta=beta) == pytest.approx(expected, rel=1e-12)
    # two pairs: mean
    lp2 = pair([-6.0, -1.0], [-10.0, -1.0], [-3.0, -1.0], [-2.0, -1.0], nc=[4, 1], nr=[2, 1])
    expected2 = (expected + (0 - 1 / (2 * beta)) ** 2) / 2
    assert loss("ipo", lp2, beta=beta) == pytest.approx(expected2, rel=1e-12)


def test_minor_dpo_hand_computed():
    # r_w = 1, r_l = 2 (>= 0: as DPO), and r_w = 1, r_l = -3 (< 0: clipped to 0)
    lp = pair([-1.0, -1.0], [-2.0, -2.0], [-3.0, -8.0], [-5.0, -5.0])
    expected = (-logsig(0.5 * (1 - 2)) - logsig(0.5 * (1 - 0))) / 2
    assert loss("minor_dpo", lp, beta=0.5) == pytest.approx(expected, rel=1e-12)


def test_minor_dpo_matches_dpo_when_rejected_above_reference_and_stops_below():
    torch.manual_seed(1)
    pc, rc = -torch.rand(6, dtype=D) * 30, -torch.rand(6, dtype=D) * 30
    rr = -torch.rand(6, dtype=D) * 30
    n = torch.ones(6, dtype=torch.long)
    above = rr + torch.rand(6, dtype=D) * 5  # r_l >= 0
    below = rr - 0.1 - torch.rand(6, dtype=D) * 5  # r_l < 0

    def run(name, pr):
        x = pr.clone().requires_grad_(True)
        lp = PairLogps(SeqLogps(pc, n, rc), SeqLogps(x, n, rr))
        value = REGISTRY[name].loss(lp)
        value.backward()
        return value.item(), x.grad

    v_minor, g_minor = run("minor_dpo", above)
    v_dpo, g_dpo = run("dpo", above)
    assert v_minor == pytest.approx(v_dpo, rel=1e-12)
    torch.testing.assert_close(g_minor, g_dpo)
    assert (g_dpo > 0).all()

    v_minor, g_minor = run("minor_dpo", below)
    v_dpo, g_dpo = run("dpo", below)
    assert v_minor > v_dpo  # r_l < 0 no longer counts in y_w's favour
    assert torch.equal(g_minor, torch.zeros(6, dtype=D))  # y_l is not pushed down any more
    assert (g_dpo > 0).all()


def test_simpo_hand_computed_and_reference_free():
    # avg_logp_w = -6/3 = -2, avg_logp_l = -10/4 = -2.5
    lp = pair([-6.0], None, [-10.0], None, nc=[3], nr=[4])
    expected = -logsig(2.0 * (-2 - -2.5) - 0.5)
    assert loss("simpo", lp) == pytest.approx(expected, rel=1e-12)
    expected = -logsig(1.0 * 0.5 - 0.2)
    assert loss("simpo", lp, beta=1.0, gamma=0.2) == pytest.approx(expected, rel=1e-12)
    assert not REGISTRY["simpo"].needs_ref
    assert REGISTRY["simpo"].defaults == {"beta": 2.0, "gamma": 0.5}


def _log_odds(avg):
    p = math.exp(avg)
    return math.log(p / (1 - p))


def test_orpo_hand_computed_and_reference_free():
    # chosen: (-2 over 4 tokens, -3 over 2), rejected: (-4 over 2, -1 over 1)
    lp = pair([-2.0, -3.0], None, [-4.0, -1.0], None, nc=[4, 2], nr=[2, 1])
    nll = (2.0 + 3.0) / (4 + 2)
    ratio = (
        -logsig(_log_odds(-0.5) - _log_odds(-2.0)) - logsig(_log_odds(-1.5) - _log_odds(-1.0))
    ) / 2
    assert loss("orpo", lp, odds_ratio_weight=0.25) == pytest.approx(nll + 0.25 * ratio, rel=1e-12)
    assert loss("orpo", lp) == pytest.approx(nll + 0.1 * ratio, rel=1e-12)
    assert not REGISTRY["orpo"].needs_ref


def test_orpo_with_lam_0_is_sft_on_chosen():
    torch.manual_seed(2)
    n_w, n_l = torch.randint(1, 20, (5,)), torch.randint(1, 20, (5,))
    lp = PairLogps(
        SeqLogps(-torch.rand(5, dtype=D) * n_w, n_w), SeqLogps(-torch.rand(5, dtype=D) * n_l, n_l)
    )
    orpo_0 = REGISTRY["orpo"].loss(lp, REGISTRY["orpo"].params(odds_ratio_weight=0.0))
    assert orpo_0.item() == pytest.approx(REGISTRY["sft"].loss(lp.chosen).item(), rel=1e-12)
    assert REGISTRY["orpo"].loss(lp).item() > orpo_0.item()


def test_orpo_is_finite_near_probability_one():
    x = t([0.0, -1e-12]).requires_grad_(True)
    lp = PairLogps(SeqLogps(x, torch.tensor([3, 3])), seq([-1e-9, -50.0], None, [3, 3]))
    value = REGISTRY["orpo"].loss(lp)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(x.grad).all()


def test_una_pair_equals_dpo():
    torch.manual_seed(3)
    for beta in (0.01, 0.1, 2.0):
        x = [-torch.rand(8, dtype=D) * 40 for _ in range(4)]
        n = torch.randint(1, 30, (8,))
        lp = PairLogps(SeqLogps(x[0], n, x[1]), SeqLogps(x[2], n, x[3]))
        una = REGISTRY["una_pair"].loss(lp, REGISTRY["una_pair"].params(beta=beta))
        dpo = REGISTRY["dpo"].loss(lp, REGISTRY["dpo"].params(beta=beta))
        assert una.item() == dpo.item()


def test_preference_registry_metadata():
    for name in ("ipo", "minor_dpo", "una_pair", "simpo", "orpo"):
        obj = REGISTRY[name]
        assert obj.data == "pairs" and obj.slot == "pref" and obj.summary
    assert {n: REGISTRY[n].needs_ref for n in ("ipo", "minor_dpo", "una_pair")} == dict.fromkeys(
        ("ipo", "minor_dpo", "una_pair"), True
    )


# ---------------------------------------------------------------- unpaired


def fb(logp, ref, target, n=None, kl=None):
    return FeedbackLogps(seq(logp, ref, n), t(target), kl)


def test_kto_hand_computed():
    # KL batch: ratios (0.5, 1.5) -> z = 1. Examples: r = 3 (desirable), r = -2 (undesirable),
    # r = 0.5 (desirable).
    kl = seq([-1.0, -2.0], [-1.5, -3.5])
    lp = fb([-1.0, -4.0, -2.0], [-4.0, -2.0, -2.5], [1.0, 0.0, 1.0], kl=kl)
    beta, wd, wu = 0.5, 1.5, 0.7
    desirable = [wd * (1 - sig(beta * (3 - 1))), wd * (1 - sig(beta * (0.5 - 1)))]
    undesirable = [wu * (1 - sig(beta * (1 - -2)))]
    expected = sum(desirable + undesirable) / 3
    got = loss("kto", lp, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert got == pytest.approx(expected, rel=1e-12)


def test_kto_kl_estimate_is_clamped_at_zero():
    kl = seq([-3.0, -2.0], [-1.0, -1.0])  # mean ratio -1.5 -> z = 0
    lp = fb([-1.0, -4.0], [-4.0, -2.0], [1.0, 0.0], kl=kl)  # r = 3, -2
    expected = ((1 - sig(0.1 * 3)) + (1 - sig(0.1 * 2))) / 2
    assert loss("kto", lp) == pytest.approx(expected, rel=1e-12)


def test_kto_kl_estimate_is_detached():
    kl_logp = t([-1.0, -2.0]).requires_grad_(True)
    kl = SeqLogps(kl_logp, torch.tensor([1, 1]), t([-1.5, -3.5]))
    x = t([-1.0, -4.0]).requires_grad_(True)
    lp = FeedbackLogps(SeqLogps(x, torch.tensor([1, 1]), t([-4.0, -2.0])), t([1.0, 0.0]), kl)
    REGISTRY["kto"].loss(lp).backward()
    assert kl_logp.grad is None
    # gradient through r only: d/dr (1 - sig(b(r - z))) = -b sig'(.), z = 1
    b = 0.1
    g = [-b * sig(b * 2) * (1 - sig(b * 2)) / 2, b * sig(b * 3) * (1 - sig(b * 3)) / 2]
    torch.testing.assert_close(x.grad, t(g))


def test_kto_without_kl_batch_raises():
    lp = fb([-1.0], [-2.0], [1.0])
    with pytest.raises(ValueError, match="KL"):
        REGISTRY["kto"].loss(lp)


def test_una_binary_mse_and_bce():
    lp = fb([-1.0, -4.0, -10.0], [-4.0, -2.0, -12.0], [1.0, 0.0, 0.0])  # r = 3, -2, 2
    beta = 0.5
    s = [sig(beta * 3), sig(beta * -2), sig(beta * 2)]
    mse = ((s[0] - 1) ** 2 + s[1] ** 2 + s[2] ** 2) / 3
    bce = -(math.log(s[0]) + math.log(1 - s[1]) + math.log(1 - s[2])) / 3
    assert loss("una_binary", lp, beta=beta) == pytest.approx(mse, rel=1e-12)
    assert loss("una_binary", lp, beta=beta, loss="bce") == pytest.approx(bce, rel=1e-12)
    assert REGISTRY["una_binary"].defaults == {"beta": 0.01, "loss": "mse"}


def test_una_binary_bce_is_stable_for_large_ratios():
    lp = fb([-1.0, -5000.0], [-5000.0, -1.0], [0.0, 1.0])  # r = +-4999, wrong label each
    value = loss("una_binary", lp, beta=1.0, loss="bce")
    assert value == pytest.approx(4999.0, rel=1e-9)


def test_una_score_hand_computed():
    lp = fb([-1.0, -4.0], [-4.0, -2.0], [0.75, 0.2])  # r = 3, -2
    beta = 0.3
    expected = ((sig(beta * 3) - 0.75) ** 2 + (sig(beta * -2) - 0.2) ** 2) / 2
    assert loss("una_score", lp, beta=beta) == pytest.approx(expected, rel=1e-12)
    assert REGISTRY["una_score"].defaults == {"beta": 0.03}


def test_unpaired_registry_metadata():
    for name in ("kto", "una_binary", "una_score"):
        obj = REGISTRY[name]
        assert obj.data == "unpaired" and obj.needs_ref and obj.summary


def test_hyper_parameter_validation():
    with pytest.raises(ValueError):
        REGISTRY["una_binary"].params(loss="hinge")
    with pytest.raises(ValueError):
        REGISTRY["simpo"].params(margin=1.0)
    with pytest.raises(ValueError):
        REGISTRY["kto"].params(desirable_weight="heavy")
    with pytest.raises(ValueError):
        REGISTRY["minor_sft"].params(length_normalize="sometimes")
    assert REGISTRY["kto"].params(beta=1).beta == 1.0
    assert REGISTRY["kto"].defaults == {
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }
    assert REGISTRY["minor_sft"].defaults == {"beta": 0.1, "length_normalize": False}
    assert REGISTRY["orpo"].defaults == {"odds_ratio_weight": 0.1}


def test_one_desirability_rule_target_at_least_one_half():
    from unitune.objectives import desirable

    assert desirable(t([0.0, 0.49, 0.5, 1.0])).tolist() == [False, False, True, True]
    # kto splits its examples by that rule: a target of 0.5 counts as desirable
    kl = seq([-1.0], [-1.0])
    half = loss("kto", fb([-1.0], [-3.0], [0.5], kl=kl))
    assert half == loss("kto", fb([-1.0], [-3.0], [1.0], kl=kl))
    assert half != loss("kto", fb([-1.0], [-3.0], [0.0], kl=kl))
