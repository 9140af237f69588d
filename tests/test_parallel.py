"""The `parallel` job (PAFT): L1 on the SFT delta, two branches, merge, evaluation; its config
section, and the keys it had when it was a schedule."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import Config, ConfigError, ParallelConfig, parse_config
from unitune.jobs import train
from unitune.merging.l1 import DeltaL1
from unitune.models.builtin import load_tiny
from unitune.models.config import LoraConfig
from unitune.schedules.registry import SCHEDULES
from unitune.study.plots import load_run, plot_runs
from unitune.training.resume import resumable_keys


def test_delta_l1_full_weights_is_the_l1_norm_of_the_delta_and_its_gradient_the_sign():
    model, _ = load_tiny(torch.float32)
    l1 = DeltaL1(model)
    assert l1().item() == 0.0
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[0, :3] += torch.tensor([0.5, -0.25, 1.0])
        model.model.norm.weight[1] -= 2.0
    value = l1()
    assert value.item() == pytest.approx(0.5 + 0.25 + 1.0 + 2.0, rel=1e-5)
    value.backward()
    assert w.grad[0, :3].tolist() == [1.0, -1.0, 1.0]
    assert float(w.grad[1:].abs().sum()) == 0.0  # sign(0) = 0: untouched entries feel nothing
    assert float(model.model.norm.weight.grad[1]) == -1.0


def test_delta_l1_follows_a_model_moved_or_cast_after_it_was_built():
    """The trainer moves the model to its accelerator; a move (here a cast, which runs on CPU)
    after DeltaL1 was built must not mix devices or dtypes: the start is the start as trained."""
    model, _ = load_tiny(torch.float32)
    with torch.no_grad():
        model.model.norm.weight.normal_()  # values bf16 cannot hold exactly
    l1 = DeltaL1(model)
    model.to(torch.bfloat16)
    value = l1()
    assert value.dtype == torch.bfloat16 and value.item() == 0.0
    assert all(p0.dtype == p.dtype == torch.bfloat16 for p, p0 in l1.full)
    with torch.no_grad():
        model.model.norm.weight[0] += 0.5
    assert l1().item() == pytest.approx(0.5, rel=1e-2)


def test_delta_l1_lora_is_the_l1_norm_of_the_lora_products():
    from unitune.models.lora import add_lora

    model, _ = load_tiny(torch.float32)
    model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    l1 = DeltaL1(model)
    assert not l1.full  # no copy of the base weights with LoRA
    assert l1().item() == 0.0  # B starts at zero
    torch.manual_seed(0)
    expected = 0.0
    for module in model.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            with torch.no_grad():
                module.lora_B["default"].weight.normal_()
            expected += module.get_delta_weight("default").abs().sum().item()  # peft's own delta
    assert l1().item() == pytest.approx(expected, rel=1e-5)


def test_l1_makes_the_sft_delta_sparse(tiny_config):
    """With Adam, L1 holds most entries within about one step (lr) of the base."""
    near_zero = {}
    for l1 in (0.0, 1e-3):
        raw = tiny_config("sft", max_steps=10, eval_every=10)
        raw["schedule"]["l1"] = l1
        raw["output_dir"] += f"-{l1}"
        cfg = parse_config(raw)
        train(cfg, progress=False)
        base, _ = load_tiny(torch.float32)
        tuned = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "model")
        d = torch.cat(
            [(p - q).flatten() for p, q in zip(tuned.parameters(), base.parameters(), strict=True)]
        )
        near_zero[l1] = float((d.abs() <= cfg.train.lr).float().mean())
    assert near_zero[0.0] < 0.1 and near_zero[1e-3] > 0.5


def test_l1_is_only_for_an_sft_only_schedule_and_names_the_parallel_job_s(tiny_config):
    raw = tiny_config("alright")
    raw["schedule"]["l1"] = 0.1
    with pytest.raises(ConfigError, match=r"schedule: .*l1 .*SFT only.*parallel\.l1"):
        parse_config(raw)


def _cli_train(raw: dict, tmp_path: Path) -> list[str]:
    """`unitune train` on `raw`: its exit code must be 2 (a config error) and its output one
    line, no traceback; returns that line's words."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not Path(raw["output_dir"]).exists()  # nothing trained, nothing written
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("schedule", "names"),
    [
        ({"name": "parallel"}, "schedule.name: 'parallel' is a job now: set job: parallel"),
        ({"merge": {"method": "ties"}}, "schedule.merge: moved to parallel.merge"),
        ({"sparsity_tol": 1e-6}, "schedule.sparsity_tol: moved to parallel.sparsity_tol"),
        (
            {"name": "parallel", "l1": 1e-3, "merge": {"method": "ties"}},
            "schedule.name: 'parallel' is a job now: set job: parallel; "
            "schedule.merge: moved to parallel.merge",
        ),
    ],
)
def test_the_parallel_schedule_s_keys_are_one_line_errors_naming_the_new_ones(
    tiny_config, tmp_path, schedule, names
):
    raw = tiny_config("mix")
    raw["schedule"] = schedule
    assert names in _cli_train(raw, tmp_path)


def test_job_parallel_refuses_a_per_step_schedule_and_needs_both_datasets(tiny_config, tmp_path):
    raw = tiny_config("parallel")
    raw["schedule"]["name"] = "mix"
    assert "schedule.name 'mix': job parallel trains an sft and a pref branch" in _cli_train(
        raw, tmp_path
    )
    raw = tiny_config("parallel")
    raw["data"]["pref"] = None
    assert "job parallel needs data.pref" in _cli_train(raw, tmp_path)
    raw = tiny_config("parallel")
    raw["parallel"] = {"merge": {"density": 2.0}}
    assert "parallel.merge.density" in _cli_train(raw, tmp_path)
    raw = tiny_config("mix")
    raw["job"] = "merge"
    assert "job: Input should be 'train', 'parallel' or 'reward_model'" in _cli_train(raw, tmp_path)


def test_parallel_is_a_job_not_a_schedule_and_neither_key_is_resumable():
    assert "parallel" not in SCHEDULES
    assert {"job", "parallel"} <= set(Config.model_fields)
    assert set(ParallelConfig.model_fields) == {"l1", "sparsity_tol", "merge"}
    assert not [k for k in resumable_keys() if k == "job" or k.startswith("parallel.")]
    assert resumable_keys()  # the walk does find the resumable ones


def parallel_config(tiny_config, **merge):
    raw = tiny_config("parallel", max_steps=4, eval_every=2)
    assert raw["job"] == "parallel" and "name" not in raw["schedule"]
    raw["parallel"] = {"l1": 1e-4, "merge": {"method": "task_arithmetic", **merge}}
    return raw


def test_parallel_runs_both_branches_merges_and_evaluates(tiny_config):
    cfg = parse_config(parallel_config(tiny_config, method="ties", density=0.5))
    summary = train(cfg, progress=False)
    out = Path(cfg.output_dir)
    assert summary["job"] == summary["schedule"] == "parallel"
    assert summary["steps"] == {"sft": 4, "pref": 4} and summary["l1"] == 1e-4
    assert summary["merge"]["method"] == "ties" and summary["sparsity_tol"] == cfg.train.lr
    assert parse_config(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    # each branch is an ordinary single-objective run evaluated on both objectives
    for kind in ("sft", "pref"):
        branch = json.loads((out / kind / "summary.json").read_text())
        want = {"sft": 4, "pref": 0} if kind == "sft" else {"sft": 0, "pref": 4}
        assert branch["steps"] == want and branch["job"] == "train"
        sub = yaml.safe_load((out / kind / "config.yaml").read_text())
        assert sub["job"] == "train" and sub["schedule"]["name"] == kind
        assert sub["schedule"]["l1"] == (1e-4 if kind == "sft" else 0.0)
        assert summary["branches"][kind]["f_sft"] == branch["final"]["f_sft"]
        assert 0.0 <= summary["sparsity"][kind]["sparsity"] <= 1.0
    assert summary["base"]["f_pref"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["sparsity"]["sft"]["sparsity"] > summary["sparsity"]["pref"]["sparsity"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [e["step"] for e in evals] == [0, 4]
    assert evals[-1]["f_sft"] == summary["final"]["f_sft"]
    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers
    assert merged.config.vocab_size > 0
    # in the plot: the merged run's line plus each branch's path
    run = load_run(out)
    assert set(run.branches) == {"sft", "pref"}
    png, svg = plot_runs([out], out / "plot")
    assert png.stat().st_size > 0 and 'id="run0-branch-sft"' in svg.read_text()


@pytest.mark.parametrize(
    ("weights", "expect"),
    [((1.0, 0.0), "sft"), ((0.0, 1.0), "pref"), ((0.0, 0.0), "base")],
)
def test_merged_model_is_evaluated_like_the_branches(tiny_config, weights, expect):
    """Task arithmetic with weights (1, 0) is the SFT branch, (0, 1) the preference branch and
    (0, 0) the base: the merged model's metrics must then equal that model's."""
    raw = parallel_config(tiny_config, weights=list(weights))
    raw["train"]["save_model"] = False
    summary = train(parse_config(raw), progress=False)
    want = summary["base"] if expect == "base" else summary["branches"][expect]
    for key in ("f_sft", "f_pref", "reward_acc", "deviation"):
        assert summary["final"][key] == pytest.approx(want[key], abs=1e-4), key
    assert not (Path(raw["output_dir"]) / "model").exists()  # save_model: false


def test_parallel_with_lora_merges_the_adapters(tiny_config):
    raw = parallel_config(tiny_config, weights=[1.0, 0.0])
    raw["model"]["lora"] = {"r": 4, "alpha": 8}
    summary = train(parse_config(raw), progress=False)
    out = Path(raw["output_dir"])
    assert (out / "sft" / "model" / "adapter_config.json").exists()
    assert summary["final"]["f_sft"] == pytest.approx(summary["branches"]["sft"]["f_sft"], abs=1e-4)
    assert summary["sparsity"]["sft"]["l1"] > 0


def test_parallel_in_bf16_merges_against_the_base_cast_to_bf16(tiny_config):
    """The tiny base is stored in float32; branches trained in bfloat16 start from its bf16 cast,
    which is then the merge's base. The (1, 0) merge is the SFT branch up to the float32 rounding
    of the merge's delta, and it is evaluated by the same computation as the branch."""
    from safetensors.torch import load_file

    raw = parallel_config(tiny_config, weights=[1.0, 0.0])
    raw["model"]["dtype"] = "bfloat16"
    summary = train(parse_config(raw), progress=False)
    out = Path(raw["output_dir"])
    assert (out / "base" / "config.json").exists()
    base = load_file(out / "base" / "model.safetensors")
    sft = load_file(out / "sft" / "model" / "model.safetensors")
    merged = load_file(out / "model" / "model.safetensors")
    for name, a in sft.items():
        a, b, m = a.double(), base[name].double(), merged[name].double()
        # The merge computes d = fl32(a - b), then fl32(b + d), then rounds to bf16. a and b are
        # bf16 (8-bit significands): their difference fits float32's 24 bits, so both steps are
        # exact, whenever their magnitudes are within 2^14 of each other (exponents at most 15
        # apart) or one is 0; then the merge gives a back bit for bit.
        close = ((a.abs() <= b.abs() * 2**14) & (b.abs() <= a.abs() * 2**14)) | (a == 0) | (b == 0)
        assert torch.equal(m[close], a[close]), name
        # Elsewhere each float32 step errs by at most 2^-24 of its result, |a - b| <= |a| + |b|,
        # and rounding x to the bf16 nearest it moves it at most |x - a| further from a (a is a
        # bf16 value): |m - a| <= 2 * 2^-24 * 2 * (|a| + |b|).
        assert ((m - a).abs() <= 2.0**-22 * (a.abs() + b.abs())).all(), name
    for key in ("f_sft", "f_pref", "reward_acc", "deviation"):
        assert summary["final"][key] == pytest.approx(summary["branches"]["sft"][key], rel=1e-6)
    assert summary["sparsity"]["pref"]["sparsity"] < 1.0


def test_parallel_calibrates_each_objective_alone_without_the_penalty(tiny_config):
    raw = parallel_config(tiny_config)
    raw["schedule"] |= {"ideal": "calibrate", "calibration_steps": 2}
    summary = train(parse_config(raw), progress=False)
    assert summary["f_sft_star"] > 0 and summary["f_pref_star"] > 0
    assert summary["final"]["ideal_distance"] == pytest.approx(
        math.hypot(
            summary["final"]["f_sft"] - summary["f_sft_star"],
            summary["final"]["f_pref"] - summary["f_pref_star"],
        ),
        rel=1e-6,
    )
