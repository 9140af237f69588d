"""Online training through `unitune train`: rollouts sampled by the policy, scored by rewards
(a reward model unitune trained, Python functions), learned from by una_online, online_dpo,
grpo, rloo — alone and jointly with SFT under every schedule; logged under TRL's names; resumed
bitwise (the rollout buffer included); bad rewards stopped in one line."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import final_weights, run_records
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import ConfigError, parse_config
from unitune.jobs import train
from unitune.training import checkpoint

runner = CliRunner()

REWARDS_PY = '''
def text(c):
    """TRL passes a conversational prompt's completion as [{"role": "assistant", ...}]."""
    return c if isinstance(c, str) else c[0]["content"]


def words(prompts, completions, completion_ids, **columns):
    """TRL's signature: one float per completion."""
    return [float(len(text(c).split())) for c in completions]


def exclaim(prompts, completions, completion_ids, **columns):
    """None where it cannot judge (no letter at all)."""
    return [None if not any(ch.isalpha() for ch in text(c)) else float(text(c).count("!"))
            for c in completions]


def broken(prompts, completions, completion_ids, **columns):
    raise ValueError("cannot parse the answer")


def short(prompts, completions, completion_ids, **columns):
    return [1.0] * (len(completions) - 1)
'''


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    """A reward model unitune trained (job reward_model, builtin:tiny, 2 steps) on pairs."""
    from conftest import pref_records, write_jsonl

    root = tmp_path_factory.mktemp("rm")
    train_file = write_jsonl(root / "pairs.jsonl", pref_records(["cat", "dog", "owl", "fox"] * 2))
    cfg = {
        "name": "rm", "job": "reward_model", "model": {"name": "builtin:tiny"},
        "data": {"pref": {"train": str(train_file), "eval_fraction": 0.25}, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "lr": 1e-3},
        "output_dir": str(root / "run"), "cache_dir": str(root / "cache"),
    }  # fmt: skip
    path = root / "rm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    return root / "run" / "model"


@pytest.fixture
def rewards_py(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


def online_config(tiny_config, rewards: list, objective: str = "una_online", *,
                  schedule: str = "pref", online: dict | None = None, obj: dict | None = None,
                  **train) -> dict:  # fmt: skip
    """tiny_config with an online preference slot on the tiny pairs' prompts."""
    raw = tiny_config(schedule, **{"max_steps": 2, "eval_every": 2, **train})
    if schedule == "pref":
        del raw["data"]["sft"]
    raw["objectives"] = {"pref": {"name": objective, **(obj or {})}}
    g = {"una_online": 1, "grpo": 2}.get(objective, 2)
    raw["online"] = {"rewards": rewards, "num_generations": g, "max_new_tokens": 6,
                     **(online or {})}  # fmt: skip
    raw["train"]["batch_size"] = 4
    raw["data"]["pref"]["eval_max_samples"] = 3
    return raw


def records(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if r["type"] == kind]


def cli(tmp_path: Path, raw: dict, *args: str):
    path = tmp_path / f"{raw['name']}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return runner.invoke(app, ["train", str(path), "--no-progress", *args])


TRL_NAMES = (
    "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
    "completions/max_length", "completions/clipped_ratio", "time/generate_s",
    "time/generate_share", "time/score_s", "time/reference_s", "time/train_s",
    "sampling/sampling_logp_difference/mean",
)  # fmt: skip


@pytest.mark.parametrize("objective", ["una_online", "una_online_pair", "online_dpo", "grpo",
                                       "rloo"])  # fmt: skip
def test_each_online_objective_trains_from_the_command_line(
    objective, tiny_config, tiny_rm, rewards_py, tmp_path
):
    """Each objective trains on the policy's own samples scored by a reward model unitune
    trained and a Python reward function (weighted), logs TRL's names, evaluates the held-out
    reward (f_pref = -eval_reward) and writes a sample of each generation."""
    rewards = [f"rm:{tiny_rm}", {"reward": f"{rewards_py}:words", "weight": 0.5}]
    raw = online_config(tiny_config, rewards, objective)
    res = cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    out = Path(raw["output_dir"])
    train_lines = records(out, "train")
    assert [r["step"] for r in train_lines] == [1, 2]
    for name in TRL_NAMES:
        assert name in train_lines[0], name
    assert f"rewards/rm:{tiny_rm}/mean" in train_lines[0]
    assert any(k.startswith("rewards/") and k.endswith("words/mean") for k in train_lines[0])
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:
        assert e["f_pref"] == pytest.approx(-e["eval_reward"])
    samples = sorted((out / "completions").glob("*.jsonl"))
    assert samples, "no completions written"
    first = json.loads(samples[0].read_text().splitlines()[0])
    assert {"prompt", "completion", "rewards", "reward", "record"} <= set(first)
    # the sampler's log-probs are the training pass's on a batch's first use (no stale policy)
    assert train_lines[0]["sampling/sampling_logp_difference/mean"] < 1e-4


@pytest.mark.parametrize("schedule", ["sequential", "mix", "alright", "maxright"])
def test_online_una_trains_jointly_with_sft_under_every_schedule(
    schedule, tiny_config, tiny_rm, tmp_path
):
    """SFT data in one slot, online UNA in the other: both are trained, f_sft and f_pref (minus
    the held-out reward) are reported, and so is the ideal distance (fronts, report, MAXRIGHT)."""
    raw = online_config(tiny_config, [f"rm:{tiny_rm}"], schedule=schedule, max_steps=4)
    if schedule == "maxright":  # the SFT gap starts near the tiny model's NLL (~10): an SFT
        # optimum above it leaves the preference gap larger, so the probe (minus the mean reward
        # of freshly sampled rollouts) decides for the online slot
        raw["schedule"] |= {"ideal": "config", "f_sft_star": 50.0, "f_pref_star": -1.0}
    summary = train(parse_config(raw), progress=False)
    per_step = 2 if schedule == "mix" else 1  # mix trains both slots every step
    assert summary["steps"]["sft"] + summary["steps"]["pref"] == 4 * per_step
    if schedule != "maxright":
        assert summary["steps"]["sft"] > 0, summary["steps"]
    assert summary["steps"]["pref"] > 0, summary["steps"]
    ev = records(Path(raw["output_dir"]), "eval")[-1]
    assert {"f_sft", "f_pref", "eval_reward", "ideal_distance"} <= set(ev)


@pytest.mark.parametrize("objective", ["grpo", "una_online"])
def test_lora_trains_online_against_the_adapters_disabled(
    objective, tiny_config, tiny_rm, tmp_path
):
    """LoRA throughout: the policy generates with its adapters, the reference is the same model
    with them disabled (no copy). LoRA's B starts at zero, so the KL to the reference is exactly
    0 on the first step and grows once the adapters have trained; only adapter weights are saved."""
    raw = online_config(tiny_config, [f"rm:{tiny_rm}"], objective, max_steps=4, eval_every=4,
                        obj={"beta": 0.04} if objective == "grpo" else None, lr=5e-3)  # fmt: skip
    raw["model"] = {"name": "builtin:tiny", "lora": {"r": 4, "target_modules": ["q_proj"]}}
    res = cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    out = Path(raw["output_dir"])
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0
    assert steps[-1]["kl"] > 0.0
    assert steps[0]["sampling/sampling_logp_difference/mean"] < 1e-4
    assert (out / "model" / "adapter_model.safetensors").exists()


def test_alright_generates_only_for_the_steps_it_trains_online(tiny_config, tiny_rm, tmp_path):
    """A step that does not train the preference slot generates nothing for it: the number of
    generations is the number of preference steps (one micro-batch per generation here)."""
    raw = online_config(tiny_config, [f"rm:{tiny_rm}"], schedule="alright", max_steps=6)
    raw["online"]["log_completions"] = 1
    summary = train(parse_config(raw), progress=False)
    written = list((Path(raw["output_dir"]) / "completions").glob("generation-*.jsonl"))
    assert len(written) == summary["steps"]["pref"]


def test_resume_is_bitwise_with_a_buffer_in_flight(tiny_config, tiny_rm, tmp_path):
    """steps_per_generation 2 and num_iterations 2: a generation serves 4 steps, so checkpoints
    fall inside a window; resumed from each, the run ends bit for bit on the uninterrupted one
    (weights and every logged figure): the buffer, the prompt stream and the running reward
    statistics (zscore) are in the checkpoint."""
    raw = online_config(
        tiny_config, [f"rm:{tiny_rm}"], max_steps=6, eval_every=3, save_every=1, keep_last=6,
        online={"steps_per_generation": 2, "num_iterations": 2, "score_map": "zscore"},
    )  # fmt: skip
    full = Path(raw["output_dir"])
    train(parse_config(raw), progress=False)
    want, want_w = run_records(full), final_weights(full)
    for step in (2, 5):  # inside a window, and in the second one
        cut = tmp_path / f"cut-{step}"
        shutil.copytree(full, cut, ignore=shutil.ignore_patterns("model", "summary.json"))
        for ckpt in checkpoint.list_checkpoints(cut):
            if checkpoint.step_of(ckpt) > step:
                shutil.rmtree(ckpt)
        train(parse_config({**raw, "output_dir": str(cut)}), progress=False, resume=True)
        assert _no_time(run_records(cut)) == _no_time(want), step
        got = final_weights(cut)
        assert all(torch.equal(got[k], want_w[k]) for k in want_w), step


def test_bf16_rollouts_from_the_packed_copy_resume_bitwise_and_warn_on_the_gap(
    tiny_config, tiny_rm, tmp_path
):
    """`online.generation_dtype: bfloat16` on a float32 run: rollouts and held-out answers come
    from the packed bf16 copy, refreshed before every generation (so the sampler follows the
    policy: the gap stays small, not growing with the steps), the gap to the training pass is
    logged and warned about once above `max_logp_difference`, and a resumed run ends bit for
    bit on the uninterrupted one (the copy is rebuilt from the weights)."""
    raw = online_config(
        tiny_config, [f"rm:{tiny_rm}"], max_steps=4, eval_every=2, save_every=2, keep_last=4,
        online={"generation_dtype": "bfloat16", "max_logp_difference": 0.0}, lr=1e-3,
    )  # fmt: skip
    full = Path(raw["output_dir"])
    res = cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    assert res.output.count("the sampler's log-probs differ") == 1
    steps = records(full, "train")
    gaps = [r["sampling/sampling_logp_difference/mean"] for r in steps]
    assert all(0 < g < 0.5 for g in gaps), gaps  # bf16 against fp32: small, not zero
    want, want_w = run_records(full), final_weights(full)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("model", "summary.json"))
    for ckpt in checkpoint.list_checkpoints(cut):
        if checkpoint.step_of(ckpt) > 2:
            shutil.rmtree(ckpt)
    train(parse_config({**raw, "output_dir": str(cut)}), progress=False, resume=True)
    assert _no_time(run_records(cut)) == _no_time(want)
    got = final_weights(cut)
    assert all(torch.equal(got[k], want_w[k]) for k in want_w)


def _no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sigterm_checkpoints_the_step_and_resumes_bitwise(
    tiny_config, tiny_rm, tmp_path, monkeypatch
):
    from unitune.training import loop

    raw = online_config(tiny_config, [f"rm:{tiny_rm}"], max_steps=4,
                        online={"steps_per_generation": 2})  # fmt: skip
    raw["train"]["grad_accum"] = 1
    assert cli(tmp_path, raw).exit_code == 0
    whole = final_weights(Path(raw["output_dir"]))
    step = loop.train_step

    def signalled(run, state, *args, **kw):
        got = step(run, state, *args, **kw)
        if state.step == 1:  # inside a generation window of 2 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return got

    monkeypatch.setattr(loop, "train_step", signalled)
    cut = {**raw, "output_dir": str(tmp_path / "cut")}
    res = cli(tmp_path, cut)
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    monkeypatch.setattr(loop, "train_step", step)
    res = cli(tmp_path, cut, "--resume")
    assert res.exit_code == 0, res.output
    got = final_weights(tmp_path / "cut")
    assert all(torch.equal(got[k], whole[k]) for k in whole)


# ---------------------------------------------------------------------------------- bad input
def test_a_reward_function_that_raises_stops_naming_it_and_the_record(
    tiny_config, rewards_py, tmp_path
):
    raw = online_config(tiny_config, [f"{rewards_py}:broken"])
    res = cli(tmp_path, raw)
    assert res.exit_code != 0
    line = res.output.strip().splitlines()[-1]
    assert "broken" in line and "line" in line and "checkpoint" in line, res.output
    assert "Traceback" not in res.output


def test_a_reward_function_with_the_wrong_count_stops_in_one_line(
    tiny_config, rewards_py, tmp_path
):
    raw = online_config(tiny_config, [f"{rewards_py}:short"])
    res = cli(tmp_path, raw)
    assert res.exit_code != 0 and "short" in res.output and "Traceback" not in res.output


def test_bad_reward_specs_are_config_time_errors(tiny_config, tmp_path, rewards_py):
    for spec, words in (
        (f"{rewards_py}:missing", "missing"),
        ("no_such_module_xyz:fn", "no_such_module_xyz"),
        (f"rm:{tmp_path / 'nowhere'}", "nowhere"),
    ):
        res = cli(tmp_path, online_config(tiny_config, [spec]))
        assert res.exit_code != 0 and words in res.output, res.output
        assert "Traceback" not in res.output


def test_online_config_errors(tiny_config, rewards_py):
    spec = [f"{rewards_py}:words"]
    bad = online_config(tiny_config, spec, "grpo")
    bad["train"]["batch_size"] = 3  # not a multiple of G = 2
    with pytest.raises(ConfigError, match="multiple of online.num_generations"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="at least one reward"):
        parse_config(online_config(tiny_config, []))
    offline = tiny_config("pref")
    offline["online"] = {"rewards": spec}
    with pytest.raises(ConfigError, match="trains offline"):
        parse_config(offline)


@pytest.mark.parametrize("engine", ["ddp-cpu", "zero2", "zero3"])
def test_two_processes_equal_one_process_with_accumulation(engine, tiny_config, tiny_rm, tmp_path):
    """GRPO (with a KL term: the reference is a frozen copy) on 2 processes x batch 4 under DDP,
    DeepSpeed ZeRO-2 and ZeRO-3 (generation gathers the partitioned weights) against 1 process
    x batch 4 x grad_accum 2: each global
    micro-batch draws the same prompts with the same sampling seed wherever it runs, rewards
    (and the batch statistics) are gathered before they are used, dapo's normaliser counts the
    whole generation batch: the same completions, rewards and losses, and weights equal to
    float32 rounding compounded over the steps (as the offline test, tests/test_distributed.py)."""
    from test_distributed import torchrun

    if engine != "ddp-cpu":
        pytest.importorskip("deepspeed", reason="pyproject installs DeepSpeed on Linux only")
    rm = [f"rm:{tiny_rm}"]
    two = online_config(tiny_config, rm, "grpo", max_steps=3, eval_every=3, obj={"beta": 0.04})
    two["output_dir"] = str(tmp_path / "two")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    torchrun([tmp_path / "two.yaml"], tmp_path, accelerate=engine)
    one = {**two, "output_dir": str(tmp_path / "one"), "train": {**two["train"], "grad_accum": 2}}
    train(parse_config(one), progress=False)
    a, b = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    for key in ("reward", "reward_std", "completions/mean_length", "frac_reward_zero_std"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-6), key
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-6)
    # a step's figures cover every micro-batch: the mean over the accumulated micro-batches of
    # one process is the mean over the two processes (the largest for a /max figure)
    kl = [r["kl"] for r in b]
    assert [r["kl"] for r in a] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    # the sampling/training difference is float32 rounding on both sides (a few 1e-6)
    diff = "sampling/sampling_logp_difference/max"
    assert [r[diff] for r in a] == pytest.approx([r[diff] for r in b], abs=1e-5)
    assert any(r["kl"] > 0 for r in a)
    ea, eb = records(tmp_path / "one", "eval"), records(tmp_path / "two", "eval")
    assert [e["eval_reward"] for e in ea] == pytest.approx([e["eval_reward"] for e in eb], 1e-4)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-3), k
