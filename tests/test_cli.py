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
