import json

import pytest

from unitune.schedules.alright import Alright
from unitune.schedules.maxright import Maxright
from unitune.schedules.mix import Mix
from unitune.schedules.registry import SCHEDULES, build_schedule
from unitune.schedules.sequential import Sequential


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_alright_frequency_close_to_lam(lam):
    s = Alright(lam=lam, seed=3)
    n = 4000
    pref = sum("pref" in s.plan(i, NO_PROBE) for i in range(n))
    # binomial std at n=4000 is <= 0.008; 4 sigma
    assert abs(pref / n - lam) < 0.032


def test_alright_identical_for_same_seed_and_differs_otherwise():
    a, b, c = Alright(lam=0.5, seed=7), Alright(lam=0.5, seed=7), Alright(lam=0.5, seed=8)
    pa = [tuple(a.plan(i, NO_PROBE)) for i in range(200)]
    assert pa == [tuple(b.plan(i, NO_PROBE)) for i in range(200)]
    assert pa != [tuple(c.plan(i, NO_PROBE)) for i in range(200)]


def test_alright_one_objective_per_step():
    s = Alright(lam=0.5, seed=0)
    assert all(len(s.plan(i, NO_PROBE)) == 1 for i in range(50))


def test_sequential_switches_at_one_minus_lam():
    s = Sequential(lam=0.25, total_steps=100)
    assert s.switch_step == 75
    assert s.plan(74, NO_PROBE) == {"sft": 1.0} and s.plan(75, NO_PROBE) == {"pref": 1.0}


def test_mix_weights_and_zero_weight_dropped():
    assert Mix(lam=0.3).plan(0, NO_PROBE) == pytest.approx({"sft": 0.7, "pref": 0.3})
    assert Mix(lam=0.0).plan(0, NO_PROBE) == {"sft": 1.0}
    assert Mix(lam=1.0).plan(0, NO_PROBE) == {"pref": 1.0}


class Probe:
    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self):
        self.calls += 1
        return dict(self.values)


def test_maxright_steps_on_larger_weighted_gap():
    # weighted gaps: sft 0.5*(2.0-1.0)=0.5, pref 0.5*(0.7-0.0)=0.35 -> sft
    probe = Probe({"sft": 2.0, "pref": 0.7})
    s = Maxright(lam=0.5, k=10, loss_sft_star=1.0, loss_pref_star=0.0)
    assert s.plan(0, probe) == {"sft": 1.0}
    assert s.gaps == pytest.approx({"sft": 0.5, "pref": 0.35})
    # the weighting matters: lam=0.8 -> sft 0.2*1.0=0.2 < pref 0.8*0.7=0.56
    s2 = Maxright(lam=0.8, k=10, loss_sft_star=1.0, loss_pref_star=0.0)
    assert s2.plan(0, Probe(probe.values)) == {"pref": 1.0}


def test_maxright_refreshes_chosen_gap_and_probes_every_k():
    probe = Probe({"sft": 2.0, "pref": 0.7})
    s = Maxright(lam=0.5, k=3, loss_sft_star=1.0, loss_pref_star=0.0)
    assert s.plan(0, probe) == {"sft": 1.0} and probe.calls == 1
    s.observe({"sft": 1.4})  # gap sft -> 0.2 < pref 0.35
    assert s.gaps["sft"] == pytest.approx(0.2) and s.gaps["pref"] == pytest.approx(0.35)
    assert s.plan(1, probe) == {"pref": 1.0} and probe.calls == 1  # stale gaps, no probe
    s.observe({"pref": 0.2})  # pref gap -> 0.1 < 0.2
    assert s.plan(2, probe) == {"sft": 1.0} and probe.calls == 1
    s.observe({"sft": 1.1})
    assert s.plan(3, probe) == {"sft": 1.0} and probe.calls == 2  # step 3 = k: both recomputed
    assert s.gaps == pytest.approx({"sft": 0.5, "pref": 0.35})


def NO_PROBE():
    raise AssertionError("this schedule must not probe")


def test_build_schedule_names():
    ctx = {"lam": 0.5, "total_steps": 10, "seed": 0, "loss_sft_star": 0.0, "loss_pref_star": 0.0}
    for name in ("sft", "pref", "sequential", "mix", "alright", "maxright"):
        assert build_schedule(name, **ctx).name == name
    with pytest.raises(ValueError, match="needs loss_sft_star"):
        build_schedule("maxright", **{**ctx, "loss_sft_star": None})
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("nope", **ctx)


def test_options_come_from_the_signature():
    assert set(SCHEDULES["maxright"].options.model_fields) == {"k"}
    assert build_schedule("maxright", {"k": 3}, lam=0.5, loss_sft_star=0, loss_pref_star=0).k == 3
    with pytest.raises(ValueError):
        build_schedule("maxright", {"kk": 3}, lam=0.5, loss_sft_star=0, loss_pref_star=0)


@pytest.mark.parametrize("name", ["alright", "maxright", "sequential", "mix"])
def test_state_dict_resumes_the_same_decisions(name):
    """A schedule rebuilt from its state_dict makes the same decisions as the original."""
    ctx = {"lam": 0.5, "total_steps": 40, "seed": 5, "loss_sft_star": 1.0, "loss_pref_star": 0.1}
    opts = {"k": 3} if name == "maxright" else {}
    probe = Probe({"sft": 2.0, "pref": 0.7})
    a = build_schedule(name, opts, **ctx)
    for step in range(7):
        a.plan(step, probe)
        a.observe({"sft": 1.5 - 0.05 * step, "pref": 0.6 - 0.03 * step})
    b = build_schedule(name, opts, **ctx)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through JSON, as a checkpoint
    for step in range(7, 20):
        assert a.plan(step, probe) == b.plan(step, probe)
        a.observe({"sft": 1.0, "pref": 0.5 - 0.01 * step})
        b.observe({"sft": 1.0, "pref": 0.5 - 0.01 * step})
    assert a.state_dict() == b.state_dict()


def test_sequential_resets_the_reference_once_at_its_switch():
    s = Sequential(lam=0.25, total_steps=8)
    assert [t for t in range(8) if s.resets_reference(t)] == [6]
    assert not any(Sequential(lam=1.0, total_steps=8).resets_reference(t) for t in range(8))
