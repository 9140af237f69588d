import json
import math
from pathlib import Path

import pytest
import torch
from run_parts import build
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unitune.config import ConfigError, parse_config
from unitune.jobs import train
from unitune.training.policy import Policy
from unitune.training.reference_set import References

SCHEDULES = ["sft", "pref", "sequential", "mix", "alright", "maxright"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_runs_on_tiny(tiny_config, schedule):
    cfg = parse_config(tiny_config(schedule))
    summary = train(cfg, progress=False)
    out = Path(cfg.output_dir)
    steps = summary["steps"]
    if schedule == "mix":
        assert steps == {"sft": 4, "pref": 4}
    else:
        assert steps["sft"] + steps["pref"] == 4  # one objective per step
    if schedule == "sequential":
        assert steps == {"sft": 2, "pref": 2}
    rows = read_metrics(out)
    evals = [r for r in rows if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    first = evals[0]
    assert first["f_pref"] == pytest.approx(math.log(2), abs=1e-5)  # pi_theta = pi_ref at start
    assert first["deviation"] == pytest.approx(0.0, abs=1e-5)
    for key in ("f_sft", "f_pref", "reward_acc", "reward_margin", "deviation", "ideal_distance"):
        assert all(math.isfinite(e[key]) for e in evals), key
    trains = [r for r in rows if r["type"] == "train"]
    assert {r["objective"] for r in trains} <= {"sft", "pref"} and trains[0]["tokens_per_s"] > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final"]["step"] == 4 and saved["schedule"] == schedule
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size > 0


def test_training_moves_the_objectives(tiny_config):
    cfg = parse_config(tiny_config("mix", max_steps=12, eval_every=12))
    summary = train(cfg, progress=False)
    evals = [r for r in read_metrics(Path(cfg.output_dir)) if r["type"] == "eval"]
    assert evals[-1]["f_sft"] < evals[0]["f_sft"]
    assert evals[-1]["f_pref"] < evals[0]["f_pref"]
    assert summary["final"]["reward_acc"] > 0.5


def final_weights(cfg) -> dict[str, torch.Tensor]:
    train(cfg, progress=False)
    return load_file(str(Path(cfg.output_dir) / "model" / "model.safetensors"))


def test_mix_with_lam_zero_equals_sft(tiny_config):
    mix = tiny_config("mix", max_steps=2)
    mix["schedule"]["lam"] = 0.0
    sft = tiny_config("sft", max_steps=2)
    a, b = final_weights(parse_config(mix)), final_weights(parse_config(sft))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_mix_is_the_weighted_sum(tiny_config):
    """One mix step's gradient is (1-lam) * grad f_sft + lam * grad f_pref on the same batches."""
    cfg = parse_config(tiny_config("mix", max_steps=1))
    policy = build(cfg).policy
    idx = {"sft": [0, 1, 2], "pref": [0, 1]}
    params = [p for p in policy.module.parameters() if p.requires_grad]

    def grad(weights):
        policy.module.zero_grad()
        sum(w * policy.loss(k, idx[k]).value for k, w in weights.items()).backward()
        return [p.grad.clone() for p in params]

    g_sft, g_pref, g_mix = grad({"sft": 1.0}), grad({"pref": 1.0}), grad({"sft": 0.7, "pref": 0.3})
    for a, b, m in zip(g_sft, g_pref, g_mix, strict=True):
        torch.testing.assert_close(m, 0.7 * a + 0.3 * b, atol=1e-6, rtol=1e-5)


def test_sequential_resets_the_reference_at_the_switch(tiny_config, monkeypatch):
    calls = []
    original = References.compute

    def spy(self, module, *, initial, **kw):
        before = self.get("pref", "train")
        fp = original(self, module, initial=initial, **kw)
        calls.append((initial, before, self[("pref", "train", "main")].clone()))
        return fp

    monkeypatch.setattr(References, "compute", spy)
    cfg = parse_config(tiny_config("sequential", max_steps=4))
    train(cfg, progress=False)
    assert [c[0] for c in calls] == [True, False]
    _, before, after = calls[1]
    assert not torch.allclose(before, after)  # the SFT stage moved the model: new reference
    evals = [r for r in read_metrics(Path(cfg.output_dir)) if r["type"] == "eval"]
    assert evals[1]["steps_sft"] == 2 and evals[1]["steps_pref"] == 0


def test_maxright_probes_every_k_steps(tiny_config, monkeypatch):
    probes = []
    original = Policy.probe

    def spy(self, batches):
        probes.append(sorted(batches))
        return original(self, batches)

    monkeypatch.setattr(Policy, "probe", spy)
    cfg = parse_config(tiny_config("maxright", max_steps=5))  # k = 2: steps 0, 2, 4
    train(cfg, progress=False)
    assert probes == [["pref", "sft"]] * 3


def test_ideal_from_config_and_distance(tiny_config):
    raw = tiny_config("alright", max_steps=2)
    raw["schedule"] |= {"ideal": "config", "f_sft_star": 1.0, "f_pref_star": 0.25}
    summary = train(parse_config(raw), progress=False)
    f = summary["final"]
    assert summary["f_sft_star"] == 1.0 and summary["f_pref_star"] == 0.25
    assert f["ideal_distance"] == pytest.approx(math.hypot(f["f_sft"] - 1.0, f["f_pref"] - 0.25))


def test_calibrate_is_cached(tiny_config, capsys):
    from rich.console import Console

    from unitune.training.calibration import calibrate

    cfg = parse_config(tiny_config("maxright", max_steps=2))
    cfg.schedule.calibration_steps = 2
    star = calibrate(cfg, Console(force_terminal=False))
    assert all(math.isfinite(v) for v in (star.f_sft, star.f_pref, star.loss_sft, star.loss_pref))
    assert star.f_pref <= math.log(2) + 1e-6  # best f_pref of a pref-only run is at most its start
    # sft, and dpo at eval.beta: the objectives' own losses are the metrics
    assert (star.loss_sft, star.loss_pref) == (star.f_sft, star.f_pref)
    console = Console(record=True)
    assert calibrate(cfg, console) == star
    assert "calibration cache" in console.export_text()


def test_lora_run_saves_an_adapter(tiny_config):
    raw = tiny_config("alright", max_steps=2)
    raw["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = parse_config(raw)
    train(cfg, progress=False)
    assert (Path(cfg.output_dir) / "model" / "adapter_config.json").exists()


def test_runs_with_different_precisions_in_one_process(tiny_config):
    """Accelerate's process-wide state must not pin the first run's precision (sweeps, demo)."""
    for precision in ("no", "bf16", "no"):
        raw = tiny_config("mix", max_steps=1, eval_every=1, mixed_precision=precision)
        raw["output_dir"] += f"-{precision}"
        assert math.isfinite(train(parse_config(raw), progress=False)["final"]["f_sft"])


def test_a_new_schedule_is_one_class_and_one_registry_line(tiny_config):
    """No trainer or config edit: the class's options come from its signature and its state goes
    through checkpoints like the built-in ones."""
    from unitune.schedules.registry import SCHEDULES, Stateless, register_schedule

    @register_schedule
    class EveryOther(Stateless):
        name = "every_other"
        slots = ("sft", "pref")

        def __init__(self, *, lam: float, period: int = 2):
            self.period = period

        def plan(self, step, probe):
            return {"pref": 1.0} if step % self.period == self.period - 1 else {"sft": 1.0}

    try:
        raw = tiny_config("every_other", max_steps=6)
        raw["schedule"]["period"] = 3
        summary = train(parse_config(raw), progress=False)
        assert summary["steps"] == {"sft": 4, "pref": 2}
        raw["schedule"]["periodd"] = 3
        with pytest.raises(ConfigError, match="periodd: not an option of schedule 'every_other'"):
            parse_config(raw)
    finally:
        del SCHEDULES["every_other"]
