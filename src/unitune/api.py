"""The Python API: what the `unitune` commands run, for notebooks and scripts.

    import unitune

    summary = unitune.train({"model": {"name": "builtin:tiny"}, "data": {"sft": {"train": ds}}})
    report = unitune.evaluate("runs/run")

Each function runs the same code as its command (`unitune train`, `eval`, `merge`, `sweep`) and
returns what that command writes: the run's summary.json, eval.json, the merge report, the
sweep's per-run results. A config is a YAML path, a dict shaped like the YAML, or a `Config` /
`MergeConfig`. Errors are the exceptions the command line turns into its one-line messages
(`ConfigError`, `DataError`, `ModelLoadError`, ...), raised, never `sys.exit`; a run stopped by
SIGINT / SIGTERM (a notebook's stop button) raises `Interrupted` after its checkpoint, and a
directory that another run is using is refused (`RunDirLocked`) before anything is written.

In a dict, `data.sft` / `data.pref`'s `train` and `eval` may be a `datasets.Dataset` instead of a
path. It is saved (`save_to_disk`) as `<output_dir>/datasets/<slot>-<train|eval>/` and the config
points there, so the run directory holds its data as with a file: `evaluate` and `--resume` read
it back in a later session, errors name that directory, the record and the field, and the
tokenized-data cache keys it by the saved files' content. Saving again the same dataset (by its
`datasets` fingerprint) keeps the copy already there.

`unitune.train`, `unitune.evaluate`, `unitune.merge` and `unitune.sweep` are these functions
(the packages of those layers are `unitune.training` and `unitune.merging`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitune.config import (
    Config,
    ConfigError,
    MergeConfig,
    apply_overrides,
    load_config,
    load_merge_config,
    parse_config,
    parse_merge_config,
)

if TYPE_CHECKING:
    from rich.console import Console

    from unitune.study.sweep import Sweep

ConfigLike = str | os.PathLike | dict[str, Any] | Config
PLACEHOLDER = "<datasets.Dataset>"  # stands for a Dataset while the rest of the config is checked


def train(
    config: ConfigLike,
    *,
    overrides: list[str] | None = None,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train as `unitune train CONFIG` does; returns the summary written to summary.json.

    `overrides`: `key.path=value` strings, as `--set`; `resume`: True for the newest valid
    checkpoint of `output_dir`, or a checkpoint directory (`--resume-from`). The model is
    checked before any data is read.
    """
    from unitune.jobs import train as run_job
    from unitune.models.source import check_model_source
    from unitune.training.rundir import lock_output_dir

    cfg, found = _config(config, overrides)
    check_model_source(cfg.model)
    if found:
        with lock_output_dir(cfg.output_dir):  # not under a run that is using the directory
            for (slot, split), ds in found.items():
                target = Path(cfg.output_dir) / "datasets" / f"{slot}-{split}"
                setattr(getattr(cfg.data, slot), split, save_dataset(ds, target))
    again = resume if isinstance(resume, bool) else str(resume)
    return run_job(cfg, console=console, progress=progress, resume=again)


def evaluate(
    target: str | os.PathLike,
    *,
    prompts: str | os.PathLike | None = None,
    judge: str | None = None,
    judge_url: str | None = None,
    judge_key_env: str | None = None,
    judge_trust_remote_code: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    tasks: list[str] | None = None,
    limit: int | float | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate as `unitune eval TARGET` does; returns eval.json's content.

    `target`: a run directory (its config gives the held-out prompts, the judge, the retention
    tasks and limit unless given here) or a model (local directory, hub id, `builtin:`), which
    needs `prompts` (or `tasks`) and `out`. Writes generations.jsonl and eval.json into `out`
    (default `TARGET/eval`).
    """
    from unitune.eval.evaluate import evaluate_target

    report, _ = evaluate_target(
        target, prompts=prompts, judge=judge, judge_url=judge_url, judge_key_env=judge_key_env,
        judge_trust_remote_code=judge_trust_remote_code, max_samples=max_samples,
        max_new_tokens=max_new_tokens, batch_size=batch_size, tasks=tasks, limit=limit, out=out,
        progress=progress, console=console,
    )  # fmt: skip
    return report


def merge(
    config: str | os.PathLike | dict[str, Any] | MergeConfig,
    *,
    overrides: list[str] | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Merge as `unitune merge CONFIG` does; returns the merge report (its `output` is the merged
    model's directory; the same report is in the output's merge.json)."""
    from unitune.merging.merge import merge as run_merge

    if isinstance(config, MergeConfig):
        cfg = config
        if overrides:
            cfg = parse_merge_config(apply_overrides(config.model_dump(), overrides))
    elif isinstance(config, dict):
        cfg = parse_merge_config(apply_overrides(_copy(config), overrides or []))
    else:
        cfg = load_merge_config(_existing(config), overrides)
    return run_merge(cfg, console=console, progress=progress)


def sweep(
    config: str | os.PathLike | dict[str, Any],
    *,
    keep_going: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run a sweep as `unitune sweep SWEEP` does: a sweep file, or a dict shaped like one
    (`base` or `config`, `output_dir`, `grid`, `runs`; a dict's `config` may hold Datasets,
    saved once under the sweep's `output_dir`). Finished runs are skipped and interrupted ones
    resume. Returns one `{"name", "status", "output_dir"}` per run (`status`: trained, resumed,
    skipped, or failed with `error` when `keep_going`)."""
    from unitune.study.sweep import check_models, run_sweep

    plan = _sweep(config)
    check_models(plan)
    return run_sweep(plan, console=console, progress=progress, keep_going=keep_going)


def save_dataset(ds: Any, directory: Path) -> str:
    """`ds` saved (`save_to_disk`) as `directory`, replacing what is there unless it already
    holds this dataset (the same `datasets` fingerprint); returns the directory as a config path."""
    import datasets

    state = directory / "state.json"
    if state.is_file():
        try:
            if json.loads(state.read_text()).get("_fingerprint") == ds._fingerprint:
                return str(directory)
        except (OSError, ValueError):
            pass  # unreadable: saved again
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # no "Saving the dataset" bar
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if shown:
            datasets.enable_progress_bars()
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return str(directory)


def _config(config: ConfigLike, overrides: list[str] | None) -> tuple[Config, dict]:
    """The validated config and the Datasets found in its data slots, by (slot, split)."""
    if isinstance(config, Config):
        if not overrides:
            return config, {}
        return parse_config(apply_overrides(config.model_dump(), overrides)), {}
    if isinstance(config, dict):
        data, found = _take_datasets(config)
        return parse_config(apply_overrides(data, overrides or [])), found
    return load_config(_existing(config), overrides), {}


def _take_datasets(config: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """A copy of a config dict with each `data.<slot>.<train|eval>` Dataset replaced by a
    placeholder path, and those Datasets by (slot, split). A `DatasetDict` is a `ConfigError`."""
    data = _copy(config)
    found = {}
    section = data.get("data")
    for slot in ("sft", "pref"):
        spec = section.get(slot) if isinstance(section, dict) else None
        if not isinstance(spec, dict):
            continue
        for split in ("train", "eval"):
            value = spec.get(split)
            if isinstance(value, os.PathLike):
                spec[split] = os.fspath(value)
            elif not isinstance(value, str | None) and _is_dataset(value, slot, split):
                found[slot, split] = value
                spec[split] = PLACEHOLDER
    return data, found


def _is_dataset(value: Any, slot: str, split: str) -> bool:
    import datasets

    if isinstance(value, datasets.DatasetDict):
        raise ConfigError(
            f"config: data.{slot}.{split}: a DatasetDict; give one split, e.g. ds['train']"
        )
    return isinstance(value, datasets.Dataset)


def _copy(value: Any) -> Any:
    """Plain dicts and lists copied, anything else (a Dataset, a DatasetDict) shared."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    return path


def _sweep(config: str | os.PathLike | dict[str, Any]) -> Sweep:
    from unitune.study.sweep import load_sweep, parse_sweep

    if not isinstance(config, dict):
        return load_sweep(_existing(config))
    spec = _copy(config)
    inline = spec.get("config")
    found = {}
    if isinstance(inline, dict):
        spec["config"], found = _take_datasets(inline)
    plan = parse_sweep(spec, Path("sweep"))
    for (slot, split), ds in found.items():
        path = save_dataset(ds, plan.out / "datasets" / f"{slot}-{split}")
        for run in plan.runs:
            setattr(getattr(run.cfg.data, slot), split, path)
    return plan
