import pytest

from unitune.schedules import Alright, Maxright, Mix, Sequential, build_schedule


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_alright_frequency_close_to_lam(lam):
    s = Alright(lam, seed=3)
    n = 4000
    pref = sum("pref" in s.plan(i) for i in range(n))
    # binomial std at n=4000 is <= 0.008; 4 sigma
    assert abs(pref / n - lam) < 0.032


def test_alright_identical_for_same_seed_and_differs_otherwise():
    a, b, c = Alright(0.5, seed=7), Alright(0.5, seed=7), Alright(0.5, seed=8)
    pa = [tuple(a.plan(i)) for i in range(200)]
    assert pa == [tuple(b.plan(i)) for i in range(200)]
    assert pa != [tuple(c.plan(i)) for i in range(200)]


def test_alright_one_objective_per_step():
    s = Alright(0.5, seed=0)
    assert all(len(s.plan(i)) == 1 for i in range(50))


def test_sequential_switches_at_one_minus_lam():
    s = Sequential(0.25, total_steps=100)
    assert s.switch_step == 75
    assert s.plan(74) == {"sft": 1.0} and s.plan(75) == {"pref": 1.0}


def test_mix_weights_and_zero_weight_dropped():
    assert Mix(0.3).plan(0) == pytest.approx({"sft": 0.7, "pref": 0.3})
    assert Mix(0.0).plan(0) == {"sft": 1.0}
    assert Mix(1.0).plan(0) == {"pref": 1.0}


class Probe:
    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self):
        self.calls += 1
        return dict(self.values)


def test_maxright_steps_on_larger_weighted_gap():
    # weighted gaps: sft 0.5*(2.0-1.0)=0.5, pref 0.5*(0.7-0.0)=0.35 -> sft
    probe = Probe({"sft": 2.0, "pref": 0.7})
    s = Maxright(0.5, k=10, f_sft_star=1.0, f_pref_star=0.0, probe=probe)
    assert s.plan(0) == {"sft": 1.0}
    assert s.gaps == pytest.approx({"sft": 0.5, "pref": 0.35})
    # the weighting matters: lam=0.8 -> sft 0.2*1.0=0.2 < pref 0.8*0.7=0.56
    s2 = Maxright(0.8, k=10, f_sft_star=1.0, f_pref_star=0.0, probe=Probe(probe.values))
    assert s2.plan(0) == {"pref": 1.0}


def test_maxright_refreshes_chosen_gap_and_probes_every_k():
    probe = Probe({"sft": 2.0, "pref": 0.7})
    s = Maxright(0.5, k=3, f_sft_star=1.0, f_pref_star=0.0, probe=probe)
    assert s.plan(0) == {"sft": 1.0} and probe.calls == 1
    s.observe({"sft": 1.4})  # gap sft -> 0.2 < pref 0.35
    assert s.gaps["sft"] == pytest.approx(0.2) and s.gaps["pref"] == pytest.approx(0.35)
    assert s.plan(1) == {"pref": 1.0} and probe.calls == 1  # stale gaps, no probe
    s.observe({"pref": 0.2})  # pref gap -> 0.1 < 0.2
    assert s.plan(2) == {"sft": 1.0} and probe.calls == 1
    s.observe({"sft": 1.1})
    assert s.plan(3) == {"sft": 1.0} and probe.calls == 2  # step 3 = k: both recomputed
    assert s.gaps == pytest.approx({"sft": 0.5, "pref": 0.35})


def test_build_schedule_names():
    for name in ("sft", "pref", "sequential", "mix", "alright"):
        assert build_schedule(name, lam=0.5, total_steps=10, seed=0).name == name
    with pytest.raises(ValueError):
        build_schedule("maxright", lam=0.5, total_steps=10, seed=0)
