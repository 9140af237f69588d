"""`train.report_to`: every metrics.jsonl record reaches TensorBoard, W&B (offline) and MLflow
(a local file store) through Accelerate's trackers, files under RUN_DIR/trackers/; a resumed
run continues the same tracker run; a missing package is one start-up line naming the extra."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import ConfigError, parse_config
from unitune.jobs import train
from unitune.training import trackers
from unitune.training.engines import EngineError

SKIP = ("type", "objective", "step")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every numeric metric of metrics.jsonl: tag -> {step: value}, tags as the README names
    them (`train/<objective>/<key>`, `eval/<key>`)."""
    out: dict[str, dict[int, float]] = {}
    for r in read_metrics(run_dir):
        prefix = f"train/{r['objective']}" if r["type"] == "train" else r["type"]
        for k, v in r.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{prefix}/{k}", {})[r["step"]] = float(v)
    return out


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for tag, steps in want.items():
        assert set(got[tag]) == set(steps), tag
        for step, v in steps.items():
            g = got[tag][step]
            assert (math.isnan(g) and math.isnan(v)) or g == pytest.approx(v, rel=1e-6, abs=1e-6)


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = run_dir / "trackers" / "tensorboard" / trackers.PROJECT
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_has_every_metric_at_its_step(tiny_config):
    cfg = parse_config(tiny_config("mix", report_to=["tensorboard"], save_model=False))
    train(cfg, progress=False)
    out = Path(cfg.output_dir)
    logdir = out / "trackers" / "tensorboard" / trackers.PROJECT
    got = tensorboard_scalars(out)
    want = expected(out)
    assert {"train/sft/loss", "train/pref/loss", "eval/f_sft", "eval/f_pref"} <= set(want)
    assert sorted(want["eval/f_sft"]) == [0, 2, 4]
    assert sorted(want["train/sft/loss"]) == [1, 2, 3, 4]
    assert_same(got, want)
    # the resolved config as hyper-parameters (Accelerate's hparams.yml beside the events)
    (hparams,) = logdir.glob("*/hparams.yml")
    params = yaml.safe_load(hparams.read_text())
    assert params["train.lr"] == cfg.train.lr and params["schedule.name"] == "mix"
    assert params["train.report_to"] == '["tensorboard"]'


def test_wandb_offline_writes_its_run(tiny_config, tmp_path, monkeypatch):
    for key, value in {
        "WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb-env",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": "k" * 40,
    }.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    cfg = parse_config(tiny_config("alright", max_steps=2, report_to=["wandb"], save_model=False))
    train(cfg, progress=False)
    root = Path(cfg.output_dir) / "trackers"
    run_id = json.loads((root / "ids.json").read_text())["wandb"]
    (run_dir,) = (root / "wandb" / "wandb").glob(f"offline-run-*-{run_id}")
    (data,) = run_dir.glob(f"run-{run_id}.wandb")
    assert data.stat().st_size > 0
    assert "k" * 40 not in data.read_bytes().decode("latin-1")  # the API key is not recorded


def test_mlflow_file_store_and_resume_continue_one_run(tiny_config, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    raw = tiny_config(
        "alright", max_steps=2, save_every=2, report_to=["mlflow", "tensorboard"], save_model=False
    )
    train(parse_config(raw), progress=False)
    raw["train"]["max_steps"] = 4  # resumed, trained on to step 4
    cfg = parse_config(raw)
    train(cfg, progress=False, resume=True)
    out = Path(cfg.output_dir)
    uri = (out / "trackers" / "mlruns").resolve().as_uri()
    assert mlflow.get_tracking_uri() == uri
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(trackers.PROJECT)
    (run,) = client.search_runs([exp.experiment_id])  # the resumed session appended to it
    ids = json.loads((out / "trackers" / "ids.json").read_text())
    assert run.info.run_id == ids["mlflow"]["run_id"]
    assert run.data.params["train.seed"] == "0" and run.data.params["schedule.name"] == "alright"
    got = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
    }
    want = expected(out)  # metrics.jsonl: the whole history, steps 0-4, no step twice
    assert sorted(want["eval/f_sft"]) == [0, 2, 4]
    assert_same(got, want)
    assert_same(tensorboard_scalars(out), want)  # both sessions' event files


def test_missing_package_is_one_start_up_line(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda module: module != "tensorboard")
    raw = tiny_config("alright", report_to=["wandb", "tensorboard"])
    with pytest.raises(EngineError, match=r'pip install "unitune\[tensorboard\]"'):
        train(parse_config(raw), progress=False)
    assert not Path(raw["output_dir"]).exists()  # nothing trained, nothing written
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == [
        "error: train.report_to: tensorboard is not installed; install with: pip install "
        '"unitune[tensorboard]"'
    ]


def test_report_to_is_checked(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to.0"):
        parse_config(tiny_config("alright", report_to=["neptune"]))
    with pytest.raises(ConfigError, match="named twice"):
        parse_config(tiny_config("alright", report_to=["wandb", "wandb"]))
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "s3cr3t-value-0042")
    raw = tiny_config("alright")
    raw["data"]["sft"]["train"] = "data/s3cr3t-value-0042/sft.jsonl"
    flat = trackers.flat_config(parse_config(raw))
    assert flat["data.sft.train"] == "data/***/sft.jsonl"
    assert "s3cr3t-value-0042" not in json.dumps(flat)


def test_values_are_namespaced_numbers():
    rec = {"type": "train", "step": 3, "objective": "pref", "loss": 0.5, "lr": 1e-3,
           "grad_norm": 2.0, "tokens": 100, "flag": True, "note": "x"}  # fmt: skip
    assert trackers.values(rec) == (
        {"train/pref/loss": 0.5, "train/pref/lr": 1e-3, "train/pref/grad_norm": 2.0,
         "train/pref/tokens": 100},
        3,
    )  # fmt: skip
    assert trackers.values({"type": "eval", "step": 0, "f_sft": 4.0}) == ({"eval/f_sft": 4.0}, 0)
