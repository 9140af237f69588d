import math

import pytest
import torch

from unitune.objectives import REGISTRY, PairLogps, SeqLogps


def pair(pc, pr, rc, rr, nc=None, nr=None):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    nc = torch.tensor(nc or [1] * len(pc))
    nr = torch.tensor(nr or [1] * len(pr))
    return PairLogps(SeqLogps(t(pc), nc, t(rc)), SeqLogps(t(pr), nr, t(rr)))


def test_dpo_is_log2_when_policy_equals_reference():
    lp = pair([-3.0, -7.5], [-4.0, -2.0], [-3.0, -7.5], [-4.0, -2.0])
    assert REGISTRY["dpo"].loss(lp).item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_hand_computed():
    # r_w = -1 - (-2) = 1, r_l = -3 - (-2.5) = -0.5, beta = 0.5: -logsigmoid(0.75)
    lp = pair([-1.0], [-3.0], [-2.0], [-2.5])
    params = REGISTRY["dpo"].params(beta=0.5)
    expected = math.log(1 + math.exp(-0.75))
    assert REGISTRY["dpo"].loss(lp, params).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_is_mean_over_pairs():
    a, b = pair([-1.0], [-3.0], [-2.0], [-2.5]), pair([0.0], [0.0], [0.0], [-4.0])
    both = pair([-1.0, 0.0], [-3.0, 0.0], [-2.0, 0.0], [-2.5, -4.0])
    dpo = REGISTRY["dpo"]
    assert dpo.loss(both).item() == pytest.approx((dpo.loss(a) + dpo.loss(b)).item() / 2)


def test_sft_is_token_mean_over_batch():
    lp = SeqLogps(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]))
    assert REGISTRY["sft"].loss(lp).item() == pytest.approx(8.0 / 4.0)


def test_registry_params_reject_unknown_and_bad_values():
    with pytest.raises(ValueError):
        REGISTRY["dpo"].params(gamma=1.0)
    with pytest.raises(ValueError):
        REGISTRY["dpo"].params(beta="high")
    assert REGISTRY["dpo"].defaults == {"beta": 0.1}
