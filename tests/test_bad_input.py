"""Bad input fails in one line, before anything runs: models that cannot be loaded (missing
paths, pickle-only directories, unreachable hub ids) and score data given to objectives that
need labels. Through the command line, as users meet them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import msg, write_jsonl
from typer.testing import CliRunner

from unitune.cli import app

runner = CliRunner()


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(output: str) -> str:
    """The output is exactly one `error: ...` line, with no traceback; returns it."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    return lines[0]


def run_with_model(tiny_config, tmp_path, name: str, command: str = "train") -> str:
    """`unitune COMMAND` on a config whose model is `name` and whose preference data has a bad
    record: a model error can only come first if the model is checked before the data is read."""
    raw = tiny_config("alright")
    raw["model"]["name"] = name
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}])
    raw["data"]["pref"]["train"] = str(bad)
    args = [command, str(write_config(tmp_path, raw))]
    res = runner.invoke(app, args + (["--no-progress"] if command == "train" else []))
    assert res.exit_code == 2, res.output
    assert not Path(raw["output_dir"]).parent.exists()  # no run directory was created
    assert not Path(raw["cache_dir"]).exists()  # nor the cache (no calibration, no references)
    line = one_line_error(res.output)
    assert "bad.jsonl" not in line  # the data was not read
    return line


# -------------------------------------------------------------------------------------- models


def test_missing_absolute_path(tiny_config, tmp_path):
    missing = tmp_path / "models" / "mine"
    line = run_with_model(tiny_config, tmp_path, str(missing))
    assert f"model.name '{missing}'" in line and "no such directory" in line
    assert "check the path" in line


@pytest.mark.parametrize("name", ["models/mine", "models/mine/", "./mine", "a/b/c"])
def test_relative_missing_path_is_not_taken_for_a_hub_id(tiny_config, tmp_path, monkeypatch, name):
    """`models/mine` with a local `models/` directory, a trailing slash, `./`, or a name that
    cannot be a hub id (`owner/name`): a path, reported as a missing directory at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    line = run_with_model(tiny_config, tmp_path, name)
    assert f"model.name '{name}'" in line and "no such directory" in line
    assert str(tmp_path) in line  # where the relative path was looked for


def test_pickle_only_directory(tiny_config, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")
    line = run_with_model(tiny_config, tmp_path, str(model))
    assert f"model.name '{model}'" in line
    assert "pytorch_model.bin" in line and "safetensors" in line
    assert "use_safetensors=False).save_pretrained(NEW_DIR)" in line  # the remedy


def test_calibrate_checks_the_model_first(tiny_config, tmp_path):
    line = run_with_model(tiny_config, tmp_path, str(tmp_path / "nope"), command="calibrate")
    assert "no such directory" in line


def test_demo_checks_its_model_first(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2
    line = one_line_error(res.output)
    assert f"--model '{tmp_path / 'nope'}': no such directory" in line
    assert not out.exists()


def test_merge_uses_the_same_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    raw = {"base": "models/base", "models": [{"path": "builtin:tiny"}], "output": "merged"}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["merge", str(path), "--no-progress"])
    assert res.exit_code == 2
    line = one_line_error(res.output)
    assert "'models/base': no such directory" in line
    assert not (tmp_path / "merged").exists()


HUB_ENVS = {
    "offline": {"HF_HUB_OFFLINE": "1"},
    "no network": {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
}


@pytest.mark.parametrize("env", HUB_ENVS.values(), ids=HUB_ENVS.keys())
def test_unreachable_hub_id(tiny_config, tmp_path, env):
    """A hub id that is not cached, with HF_HUB_OFFLINE=1 or with the hub unreachable: one
    line naming the model and the remedy, at once (no retries), before the data is read.
    A subprocess, because huggingface_hub reads these variables when imported."""
    raw = tiny_config("alright")
    raw["model"]["name"] = "some-org/some-model"
    config = write_config(tmp_path, raw)
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    res = subprocess.run(
        [sys.executable, "-m", "unitune.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line_error(res.stdout + res.stderr)
    assert "model.name 'some-org/some-model': not a local directory" in line
    assert "use a local directory" in line
    if env["HF_HUB_OFFLINE"] == "1":
        assert "HF_HUB_OFFLINE=1" in line and "has no copy of it" in line
    else:
        assert "could not be reached" in line and "HF_HUB_OFFLINE=1" in line
    assert not Path(raw["output_dir"]).parent.exists()


# ---------------------------------------------------------------------------------------- data


def score_rows(scores: list[float]) -> list[dict]:
    return [
        {
            "prompt": [msg("user", f"Rate answer {i}.")],
            "completion": [msg("assistant", f"Answer number {i}.")],
            "score": s,
        }
        for i, s in enumerate(scores)
    ]


@pytest.mark.parametrize("objective", ["kto", "una_binary"])
def test_score_data_for_a_label_objective_is_an_error(tiny_config, tmp_path, objective):
    scores = write_jsonl(tmp_path / "scores.jsonl", score_rows([1, 9, 3, 7, 10, 0]))
    raw = tiny_config("alright")
    raw["data"]["pref"] = {"train": str(scores), "score_range": [0, 10]}
    raw["objectives"] = {"pref": {"name": objective}}
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "--no-progress"])
    assert res.exit_code == 2
    line = one_line_error(res.output)
    assert "scores.jsonl: field 'score'" in line
    assert f"{objective} needs labels; data.pref has scores" in line
    assert "data.pref.label_threshold" in line
    assert not Path(raw["output_dir"]).exists()


def test_label_threshold_turns_scores_into_labels_for_kto(tiny_config, tmp_path):
    from unitune.config import parse_config
    from unitune.models.builtin import tiny_tokenizer
    from unitune.training.batches import load_data

    # mapped to [0, 1] by [0, 10]: 0.1, 0.9, 0.3, 0.7, 0.5 (on the threshold), 0.0
    scores = write_jsonl(tmp_path / "scores.jsonl", score_rows([1, 9, 3, 7, 5, 0]))
    raw = tiny_config("alright")
    pref = {"train": str(scores), "eval": str(scores), "score_range": [0, 10]}
    raw["data"]["pref"] = pref | {"label_threshold": 0.5}
    raw["objectives"] = {"pref": {"name": "kto"}}
    split = load_data(parse_config(raw), tiny_tokenizer())["pref"]
    assert [f.target for f in split.eval] == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]  # >=, not >
    assert {f.kind for f in split.train + split.eval} == {"label"}
