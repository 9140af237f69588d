"""`unitune sweep SWEEP.yaml`: a base run config times a grid of config keys, one run directory
each, run one after another in this process, stoppable and restartable.

A sweep file::

    base: base.yaml            # a run config (a path relative to this file), or
    # config: {...}            # the run config inline
    output_dir: runs/sweep     # the sweep directory (default: runs/<file name>)
    grid:                      # every combination of these values
      schedule.lam: [0.25, 0.5, 0.75]
      train.seed: [0, 1, 2]
    runs:                      # optional: explicit variants, each combined with the grid
      - {schedule.name: mix}
      - {schedule.name: maxright, schedule.k: 10}

Each run is an ordinary run directory `<output_dir>/<name>`, named by its varied keys (the last
part of each key: `schedule-mix_lam-0.5_seed-0`). A run with a `summary.json` is done and skipped; a
run with a valid checkpoint resumes from it (`unitune train --resume`); any other starts afresh.
Reference log-probs and calibrations are cached by content (`refcache.py`, `calibration.py`), so
runs that share a model and data compute them once for the whole sweep.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from unitune.config import Config, ConfigError, apply_overrides, dump_config, parse_config
from unitune.core.io import atomic_write
from unitune.data import DataError
from unitune.jobs import train as run_job
from unitune.merging.errors import MergeError
from unitune.models.errors import ModelLoadError
from unitune.models.source import check_model_source
from unitune.training.checkpoint import CheckpointError, latest_checkpoint
from unitune.training.engines import EngineError
from unitune.training.hub import HubError
from unitune.training.loop import JudgeFailedError, NonFiniteError
from unitune.training.resume import ResumeError
from unitune.training.rundir import RunDirLocked

# what one run may fail with that does not stop the others (`keep_going`)
RUN_ERRORS = (
    DataError, ModelLoadError, ResumeError, CheckpointError, NonFiniteError, EngineError, HubError,
    JudgeFailedError, RunDirLocked, MergeError,
)  # fmt: skip

SWEEP_KEYS = {"base", "config", "output_dir", "grid", "runs"}


@dataclass
class SweepRun:
    """One point of the sweep: its name, the keys it sets and its resolved config."""

    name: str
    overrides: dict[str, Any]
    cfg: Config

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def status(self) -> str:
        """`done` (summary.json written), `resume` (a valid checkpoint; for `parallel`, a branch
        started or finished) or `new`."""
        if (self.out / "summary.json").exists():
            return "done"
        quiet = _ignore
        if latest_checkpoint(self.out, log=quiet) is not None:
            return "resume"
        if self.cfg.job == "parallel" and any(
            (self.out / k / "summary.json").exists()
            or latest_checkpoint(self.out / k, log=quiet) is not None
            for k in ("sft", "pref")
        ):
            return "resume"
        return "new"


@dataclass
class Sweep:
    path: Path
    out: Path
    runs: list[SweepRun]


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file; every run's config is validated before anything runs, and
    an error names the sweep file, the run and the key."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_sweep(spec, path)


def parse_sweep(spec: Any, path: Path) -> Sweep:
    """Expand a sweep file's content (`load_sweep`); `path` names it in errors, resolves a
    relative `base:` and gives the default output directory, runs/<its stem>."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a sweep file has "
            f"{', '.join(sorted(SWEEP_KEYS))}"
        )
    base = _base_config(spec, path)
    out = Path(spec.get("output_dir") or Path("runs") / path.stem)
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError(f"{path}: grid: a mapping of config keys to non-empty lists of values")
    variants = spec.get("runs") or [{}]
    if not isinstance(variants, list) or any(not isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: runs: a list of mappings of config keys to values")
    points = [
        {**variant, **dict(zip(grid, values, strict=True))}
        for variant in variants
        for values in itertools.product(*grid.values())
    ]
    varied = _varied_keys(points)
    runs, seen = [], {}
    for i, point in enumerate(points):
        name = run_name({k: point[k] for k in varied if k in point}) or "run"
        if name in seen:
            raise ConfigError(
                f"{path}: runs {seen[name]} and {i} set the same values ({name}); "
                "every run of a sweep must differ"
            )
        seen[name] = i
        data = copy.deepcopy(base)
        for key in ("output_dir", "name"):
            if key in point:
                raise ConfigError(f"{path}: run {i} ({name}): {key} is set by the sweep")
        try:
            apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in point.items()])
            data["output_dir"], data["name"] = str(out / name), name
            cfg = parse_config(data, f"{path}, run {i} ({name})")
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        runs.append(SweepRun(name, point, cfg))
    return Sweep(path, out, runs)


def _base_config(spec: dict, path: Path) -> dict[str, Any]:
    if ("base" in spec) == ("config" in spec):
        raise ConfigError(f"{path}: give either base (a config file) or config (inline)")
    if "config" in spec:
        if not isinstance(spec["config"], dict):
            raise ConfigError(f"{path}: config: a mapping (a run config)")
        return copy.deepcopy(spec["config"])
    base = Path(spec["base"])
    if not base.is_absolute():
        base = path.parent / base
    if not base.exists():
        raise ConfigError(f"{path}: base: {base}: no such file")
    try:
        data = yaml.safe_load(base.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{base}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{base}: the top level must be a mapping")
    return data


def _varied_keys(points: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every run, in first-seen order."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in points}) > 1]


def run_name(values: dict[str, Any]) -> str:
    """A directory name from the varied keys: the last part of each key (a `name`'s section)
    and its value, `schedule-mix_lam-0.5_seed-0`; the last two parts where that is ambiguous."""
    last = [_short(k) for k in values]
    parts = []
    for key, value in values.items():
        short = _short(key)
        if last.count(short) > 1:
            short = "-".join(key.split(".")[-2:])
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        parts.append(f"{short}-{_safe(str(text))}")
    return "_".join(parts)


def _short(key: str) -> str:
    """A key's last part; a `name` is named by its section (`schedule.name` -> `schedule`)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _ignore(_msg: str) -> None:
    pass


def check_models(sweep: Sweep) -> None:
    """Every model of the sweep loadable (`check_model_source`), before anything runs: a one-line
    `ModelLoadError` naming the sweep file and a run with that model."""
    for r in {r.cfg.model.name: r for r in sweep.runs}.values():
        check_model_source(r.cfg.model, label=f"{sweep.path}: run {r.name}: model.name")


def write_configs(sweep: Sweep) -> list[Path]:
    """Each run's resolved config as `<out>/configs/<name>.yaml` (what `--print-commands`
    points `unitune train` at), and the sweep's plan as `<out>/sweep.json`. A run that already
    started with another config (the sweep file was edited) is an error naming it: its results
    would not be what the file now says."""
    cfg_dir = sweep.out / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in sweep.runs:
        p, text = cfg_dir / f"{run.name}.yaml", dump_config(run.cfg)
        if p.exists() and p.read_text() != text and run.status() != "new":
            raise ConfigError(
                f"{sweep.path}: run {run.name} ({run.out}) was started with another config "
                f"({p}); delete {run.out} to run it again with this one"
            )
        atomic_write(p, text)
        paths.append(p)
    plan = {
        "sweep": str(sweep.path),
        "runs": [
            {"name": r.name, "set": r.overrides, "output_dir": str(r.out)} for r in sweep.runs
        ],
    }
    atomic_write(sweep.out / "sweep.json", json.dumps(plan, indent=2))
    return paths


def commands(sweep: Sweep) -> list[str]:
    """One `unitune train` command per run (for a SLURM job array or any scheduler): resumes
    where a checkpoint exists; a finished run's line is a comment."""
    lines = []
    for run, cfg_path in zip(sweep.runs, write_configs(sweep), strict=True):
        status = run.status()
        cmd = f"unitune train {cfg_path}" + (" --resume" if status == "resume" else "")
        lines.append(f"# done: {cmd}" if status == "done" else cmd)
    return lines


def run_sweep(
    sweep: Sweep, *, console: Console | None = None, progress: bool = True, keep_going: bool = False
) -> list[dict[str, Any]]:
    """Run every run that is not done, in order: finished runs are skipped, interrupted ones
    resume from their newest checkpoint. Returns one `{"name", "status", "output_dir"}` per run
    (`status`: skipped, resumed, trained, failed). `Interrupted` (SIGINT/SIGTERM) stops the
    sweep after the current run checkpointed; rerunning the sweep continues it. A run's error
    stops the sweep too, unless `keep_going` (then it is reported and the next run starts)."""
    console = console or Console()
    write_configs(sweep)
    results = []
    for i, run in enumerate(sweep.runs, 1):
        status = run.status()
        head = f"sweep {sweep.out}: run {i}/{len(sweep.runs)} {run.name}"
        if status == "done":
            console.log(f"{head}: done, skipped")
            results.append({"name": run.name, "status": "skipped", "output_dir": str(run.out)})
            continue
        console.log(f"{head}: {'resuming' if status == 'resume' else 'starting'}")
        try:
            run_job(run.cfg, console=console, progress=progress, resume=status == "resume")
        except RUN_ERRORS as e:
            if not keep_going:
                raise
            console.log(f"{head}: failed: {e}")
            results.append({"name": run.name, "status": "failed", "error": str(e),
                            "output_dir": str(run.out)})  # fmt: skip
            continue
        done = "resumed" if status == "resume" else "trained"
        results.append({"name": run.name, "status": done, "output_dir": str(run.out)})
    return results
