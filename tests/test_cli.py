import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from unitune.cli import app

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
