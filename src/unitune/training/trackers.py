"""Experiment trackers (`train.report_to`) through Accelerate's: TensorBoard, Weights & Biases,
MLflow.

`accelerator_kwargs(cfg)` is what `engines.accelerator` gives the Accelerator (`log_with`, and the
project directory `<output_dir>/trackers/`); `missing(names)` is the start-up check for their
packages. `start(acc, cfg, resumed_at=)` opens the trackers' run with the resolved config as a
flat dict (secrets redacted), `sink(acc)` is the `rundir.MetricsLog` sink that logs every
metrics.jsonl record's numeric values (`values`), and `finish(acc)` closes them.

Where the files go: TensorBoard `trackers/tensorboard/unitune/`; W&B `trackers/wandb/`
(`WANDB_MODE=offline` writes an offline run there); MLflow a local `file:` store
`trackers/mlruns/`, unless `MLFLOW_TRACKING_URI` names another. A resumed run appends to the same
tracker run: the W&B run id and the MLflow run id are kept in `trackers/ids.json`, and TensorBoard
hides the events after the checkpoint's step (`purge_step`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import unitune
from unitune.config import Config
from unitune.core.redact import redact_values

PROJECT = "unitune"  # the W&B project, MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides) and
# TensorBoard sub-directory
# tracker -> (the module it needs, the unitune extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}  # fmt: skip
IDS = "ids.json"


def tracker_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "trackers"


def installed(module: str) -> bool:
    """Whether `module` can be imported (the start-up check; tests replace it)."""
    return importlib.util.find_spec(module) is not None


def missing(names: list[str]) -> str | None:
    """The one-line error for the trackers of `names` whose package is not installed, or None."""
    absent = [n for n in names if not installed(PACKAGES[n][0])]
    if not absent:
        return None
    extras = ",".join(PACKAGES[n][1] for n in absent)
    return (
        f"train.report_to: {', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not "
        f'installed; install with: pip install "unitune[{extras}]"'
    )


def accelerator_kwargs(cfg: Config) -> dict[str, Any]:
    """`log_with` and the project directory for `Accelerator(...)`; nothing without trackers."""
    if not cfg.train.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    root = tracker_dir(cfg)
    return {
        "log_with": list(cfg.train.report_to),
        "project_config": ProjectConfiguration(
            project_dir=str(root), logging_dir=str(root / "tensorboard")
        ),
    }


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as `{"train.lr": 5e-05, ...}`: scalars (None kept; TensorBoard skips
    it), lists and mappings as JSON text, every string redacted."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (list, dict)):
            out[prefix[:-1]] = json.dumps(node)
        else:
            out[prefix[:-1]] = node

    walk(cfg.model_dump(mode="json"), "")
    out["unitune_version"] = unitune.__version__
    return redact_values(out)


def values(record: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """A metrics.jsonl record as tracker values and their step: every numeric field but `step`,
    under `<type>/<objective>/` for train lines (`train/sft/loss`) and `<type>/` otherwise
    (`eval/f_sft`)."""
    prefix = str(record.get("type", "metrics"))
    if "objective" in record:
        prefix += f"/{record['objective']}"
    out = {
        f"{prefix}/{k}": v
        for k, v in record.items()
        if k not in ("type", "objective", "step")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }
    step = record.get("step")
    return out, step if isinstance(step, int) else None


def sink(acc) -> Callable[[dict[str, Any]], None] | None:
    """The `MetricsLog` sink that logs each record to the Accelerator's trackers (None without
    trackers)."""
    if not acc.log_with:
        return None

    def log(record: dict[str, Any]) -> None:
        vals, step = values(record)
        if vals:
            acc.log(vals, step=step)

    return log


def start(acc, cfg: Config, *, resumed_at: int | None = None) -> None:
    """Open the trackers' run (main process; Accelerate gates the others): the flat config as its
    parameters, the run named after the config. `resumed_at`: the checkpoint's step of a resumed
    run, which continues the same W&B / MLflow run and hides TensorBoard's later events."""
    if not acc.log_with:
        return
    root = tracker_dir(cfg)
    ids_path = root / IDS
    ids = json.loads(ids_path.read_text()) if resumed_at is not None and ids_path.exists() else {}
    name = cfg.name or cfg.schedule.name
    kwargs: dict[str, dict[str, Any]] = {}
    names = set(cfg.train.report_to)
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if "wandb" in names:
            (root / "wandb").mkdir(exist_ok=True)
    if "tensorboard" in names and resumed_at is not None:
        kwargs["tensorboard"] = {"purge_step": resumed_at + 1}
    if "wandb" in names:
        ids.setdefault("wandb", uuid.uuid4().hex[:12])
        kwargs["wandb"] = {"dir": str(root / "wandb"), "name": name, "id": ids["wandb"],
                           "resume": "allow"}  # fmt: skip
    uri = None
    if "mlflow" in names:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the local file store, which MLflow 3 only opens when asked to
            uri = (root / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        previous = ids.get("mlflow") or {}
        kwargs["mlflow"] = {"run_name": name}
        if previous.get("store") == _digest(uri) and previous.get("run_id"):
            kwargs["mlflow"]["run_id"] = previous["run_id"]
    resumed = resumed_at is not None and "mlflow" in names
    acc.init_trackers(PROJECT, config=None if resumed else flat_config(cfg), init_kwargs=kwargs)
    if not acc.is_main_process:
        return
    if resumed:  # MLflow refuses to change a logged parameter (a resumed run's max_steps may
        # change): the resumed MLflow run keeps its first session's; the others get this one's
        for tracker in acc.trackers:
            if tracker.name != "mlflow":
                tracker.store_init_configuration(flat_config(cfg))
    if "mlflow" in names:
        run = acc.get_tracker("mlflow", unwrap=True)
        ids["mlflow"] = {"run_id": run.info.run_id, "store": _digest(uri)}
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2))


def _digest(uri: str | None) -> str:
    """Which tracking store a run id belongs to, without writing its URI (it may hold
    credentials) into the run directory."""
    return hashlib.sha256(str(uri).encode()).hexdigest()[:16]


def finish(acc) -> None:
    """Close every tracker's run. Not `acc.end_training()`, which also destroys the process group
    that a later run in this process (PAFT's second branch, a sweep) still needs."""
    for tracker in getattr(acc, "trackers", []):
        tracker.finish()
    if getattr(acc, "trackers", None):
        acc.trackers = []
