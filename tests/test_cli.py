import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import parse_config

runner = CliRunner()


def write_config(tmp_path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_from_the_command_line_with_overrides(tiny_config, tmp_path):
    path = write_config(tmp_path, tiny_config("alright"))
    res = runner.invoke(app, ["train", str(path), "--set", "train.max_steps=2", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = Path(tiny_config("alright")["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["sft"] + summary["steps"]["pref"] == 2
    assert "f_sft=" in res.output


def test_config_error_names_the_key(tiny_config, tmp_path):
    raw = tiny_config("alright")
    raw["train"]["learning_rate"] = 0.1
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw))])
    assert res.exit_code == 2
    assert "train.learning_rate: unknown key" in res.output


def test_bad_record_stops_before_training(tiny_config, tmp_path):
    raw = tiny_config("alright")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "same", "rejected": "same"}\n')
    raw["data"]["pref"]["train"] = str(bad)
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw))])
    assert res.exit_code == 2
    assert "bad.jsonl" in res.output and "line 1" in res.output and "chosen" in res.output
    assert not Path(raw["output_dir"]).exists()  # nothing written


def test_missing_config_file(tmp_path):
    res = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_objectives_lists_the_registry():
    res = runner.invoke(app, ["objectives"])
    assert res.exit_code == 0 and "dpo" in res.output and "sft" in res.output


def test_demo_uses_the_precision_it_is_given(tmp_path, monkeypatch):
    from unitune.study.demo import default_precision

    precision = "no" if default_precision() == "bf16" else "bf16"  # not what it would pick
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--model", "builtin:tiny", "--steps", "2", "--schedules", "mix",
            "--precision", precision, "--no-progress", "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((out / "mix" / "config.yaml").read_text())
    assert cfg["train"]["mixed_precision"] == precision


def test_demo_over_seeds_ends_with_the_report(tmp_path, monkeypatch):
    """`unitune demo --seeds 2`: every schedule twice, then the report: mean ± std per schedule,
    win rate and retention columns, the HTML page."""
    import csv

    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--model", "builtin:tiny", "--steps", "2", "--schedules", "mix,alright",
            "--seeds", "2", "--precision", "no", "--no-progress", "-o", str(out)]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if (p / "summary.json").exists()) == [
        "alright-seed0", "alright-seed1", "mix-seed0", "mix-seed1",
    ]  # fmt: skip
    groups = list(csv.DictReader((out / "report" / "groups.csv").open()))
    assert sorted(g["schedule"] for g in groups) == ["alright", "mix"]
    assert all(g["n"] == "2" for g in groups)
    for col in ("f_sft", "win_rate", "retention:unitune_mc:acc"):
        assert all(g[f"{col}_n"] == "2" and g[f"{col}_std"] for g in groups), col
    assert "±" in result.output  # the means with their spread, on the console too
    assert (out / "report" / "index.html").exists() and "index.html" in result.output
    for run in ("mix-seed0", "alright-seed1"):
        summary = json.loads((out / run / "summary.json").read_text())
        assert "win_rate" in summary["final"] and "unitune_mc" in summary["retention"]


def test_auto_precision_follows_the_measured_bf16_speed(monkeypatch):
    """bf16 is chosen because it is fast here, not because the CPU lists bf16 instructions."""
    import torch

    from unitune.study import demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "bf16_speedup", lambda: 0.4)  # AVX2: bf16 emulated, slower
    assert demo.default_precision() == "no"
    monkeypatch.setattr(demo, "bf16_speedup", lambda: 3.0)  # AMX
    assert demo.default_precision() == "bf16"
    monkeypatch.undo()
    assert demo.bf16_speedup(rows=64, reps=2) > 0  # the real measurement runs and is a ratio


def test_demo_refuses_an_unknown_precision(tmp_path):
    result = runner.invoke(app, ["demo", "--precision", "fp8", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--precision 'fp8'" in result.output


def test_objectives_fit_an_80_column_terminal():
    from unitune.objectives import REGISTRY

    res = runner.invoke(app, ["objectives"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = " ".join(res.output.split())  # a formula may wrap onto the next line, between words
    for o in REGISTRY.values():
        assert any(line.startswith(f"{o.name}  (") for line in lines), o.name
        assert " ".join(o.summary.split()) in text, o.name
        assert o.source in text, o.name


def _never_load(monkeypatch) -> None:
    """Checking the model's source, the CLI's first step towards loading it, fails the test: an
    error must come before it."""
    import unitune.jobs  # noqa: F401  (imported before the patch: the trainer keeps its loader)
    from unitune.models import source

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(source, "check_model_source", fail)


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_an_objective_in_the_wrong_slot_is_a_config_error(tiny_config, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    raw = tiny_config("alright")
    raw["objectives"] = {"sft": {"name": "dpo"}}
    line = _one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, raw))]))
    assert "objectives.sft" in line and "'dpo' is a pref objective" in line
    assert not Path(raw["output_dir"]).exists()
    raw["objectives"] = {"pref": {"name": "ift"}}
    line = _one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, raw))]))
    assert "objectives.pref" in line and "'ift' is a sft objective" in line


def test_a_renamed_objective_key_names_the_new_one(tiny_config, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    raw = tiny_config("alright")
    for slot, name, new in (("sft", "ift", "embed_mix"), ("pref", "orpo", "odds_ratio_weight")):
        raw["objectives"] = {slot: {"name": name, "lam": 0.3}}
        line = _one_line_error(runner.invoke(app, ["train", str(write_config(tmp_path, raw))]))
        assert f"objectives.{slot}" in line and f"lam: renamed '{new}'" in line
        raw["objectives"] = {slot: {"name": name, new: 0.3}}
        cfg = parse_config(raw)
        assert getattr(cfg.objectives, slot).params().model_dump()[new] == 0.3


def test_a_config_path_that_is_a_directory(tmp_path, monkeypatch):
    _never_load(monkeypatch)
    line = _one_line_error(runner.invoke(app, ["train", str(tmp_path)]))
    assert str(tmp_path) in line and "is a directory" in line


def test_a_config_that_is_not_utf8(tiny_config, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    path = tmp_path / "latin1.yaml"
    text = yaml.safe_dump({**tiny_config("alright"), "name": "café"}, allow_unicode=True)
    path.write_bytes(text.encode("latin-1"))
    line = _one_line_error(runner.invoke(app, ["train", str(path)]))
    assert str(path) in line and "not UTF-8" in line


def _our_locations(text: str) -> set[str]:
    """The unitune source files named as `file.py:LINE` in `text` (third-party loggers, such as
    DeepSpeed's accelerator warning, format their own lines)."""
    import unitune

    ours = {p.name for p in Path(unitune.__file__).parent.rglob("*.py")}
    return {m for m in re.findall(r"(\w+\.py):\d+", text) if m in ours}


def test_log_lines_name_no_source_location_unless_verbose(tiny_config, tmp_path, monkeypatch):
    from unitune import cli

    monkeypatch.setattr(cli, "console", cli.console)  # --verbose replaces it; restored after
    path = write_config(tmp_path, tiny_config("alright", max_steps=1))
    res = runner.invoke(app, ["train", str(path), "--no-progress"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "records" in res.output  # the data lines are logged
    assert not _our_locations(res.output), res.output
    again = ["--verbose", "train", str(path), "--no-progress", "--set", "output_dir=" + str(
        tmp_path / "verbose")]  # fmt: skip
    res = runner.invoke(app, again, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "rundir.py" in _our_locations(res.output), res.output


def test_a_rerun_says_its_data_came_from_the_cache(tiny_config, tmp_path):
    raw = tiny_config("alright", max_steps=1)
    wide = {"COLUMNS": "300"}
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "--no-progress"], env=wide)
    assert res.exit_code == 0, res.output
    data_lines = [line for line in res.output.splitlines() if " records" in line]
    assert data_lines and not any("tokenized-data cache" in line for line in data_lines)
    raw["output_dir"] = str(tmp_path / "again")
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "--no-progress"], env=wide)
    assert res.exit_code == 0, res.output
    data_lines = [line for line in res.output.splitlines() if " records" in line]
    assert len(data_lines) == 4, res.output  # sft and pref, train and eval
    assert all(line.rstrip().endswith("(from the tokenized-data cache)") for line in data_lines)


def test_loading_and_saving_a_model_draw_no_transformers_bars(tmp_path, capfd):
    """transformers' "Loading weights" / "Writing model shards" bars do not reach the console;
    the hub's download bars stay on, before and after."""
    from huggingface_hub import utils as hub
    from test_architectures import save_tiny

    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.models.save import save_model

    path = save_tiny("llama", tmp_path)
    capfd.readouterr()
    assert not hub.are_progress_bars_disabled()
    model, tokenizer = load_model(ModelConfig(name=str(path)))
    save_model(model, tokenizer, tmp_path / "out")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert not hub.are_progress_bars_disabled()
