"""Benchmark retention through lm-evaluation-harness, on a model in memory.

`run_retention(model, tokenizer, tasks)` wraps the model in lm-eval's `HFLM` (no reload, no
copy) and runs `lm_eval.simple_evaluate` on the tasks. `unitune_mc`, shipped in
`unitune/eval/tasks/` (registered through `TaskManager(include_path=...)`), is a small offline
multiple-choice task: 80 simple questions with 4 choices each (arithmetic, opposites, days and
months, counts, colours, animals), written for unitune by `scripts/build_unitune_mc.py`. Any other
name is passed to lm-eval as it is (`mmlu`, `hellaswag`, ...: those download their data); names
starting with `unitune_` are looked up among the shipped tasks only, which skips indexing lm-eval's
own (about 30 s on a 2-core CPU).

lm-eval's environment report (git hash, `torch.utils.collect_env`) is skipped. lm-eval is
imported only here, when asked for; without it the error says
`pip install "unitune[eval]"`. lm-eval seeds Python's, numpy's and torch's RNGs; their states are
restored afterwards, so a retention run inside training leaves the run's random state as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unitune.models.modes import eval_mode

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_PREFIX = "unitune_"  # names looked up among the shipped tasks only (no lm-eval index)
INSTALL = 'pip install "unitune[eval]"'


class RetentionError(RuntimeError):
    """A benchmark could not run (lm-eval missing, unknown task, data unreachable)."""


def unitune_mc_dataset(**_: Any) -> Any:
    """The shipped task's documents, a `DatasetDict` with one `test` split (lm-eval's
    `custom_dataset` hook; read from the JSONL next to the task's YAML)."""
    import datasets

    rows = [json.loads(line) for line in (TASKS_DIR / "unitune_mc.jsonl").open() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def run_retention(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    *,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` for each requested task (a group's aggregate for a group such as
    `mmlu`), metrics as lm-eval names them without the filter suffix (`acc`, `acc_stderr`,
    `acc_norm`, ...). `limit`: at most that many documents per task (a fraction if < 1).

    Runs in eval mode, the model given back in the mode it had; a LoRA model is evaluated with
    its adapters on.
    """
    if not tasks:
        return {}
    lm_eval, tasks_mod, hflm = _import_lm_eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    manager = tasks_mod.TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=not all(t.startswith(SHIPPED_PREFIX) for t in tasks),
    )
    with _quiet(), _no_env_report(), _restored_rng(), eval_mode(base):
        lm = hflm(pretrained=base, tokenizer=tokenizer, batch_size=batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                limit=limit,
                num_fewshot=num_fewshot,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
            )
        except Exception as err:  # lm-eval's own errors: unknown task, data not reachable
            raise RetentionError(f"lm-eval: {_one_line(err)}") from None
    if results is None:
        raise RetentionError("lm-eval returned no results")
    return _metrics(results, tasks)


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        import lm_eval.tasks as tasks_mod
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise RetentionError(
            f"benchmark retention needs lm-evaluation-harness ({err}); install it with `{INSTALL}`"
        ) from None
    return lm_eval, tasks_mod, HFLM


def _metrics(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, Any]] = {
        **results.get("results", {}),
        **results.get("groups", {}),
    }
    names = [t for t in tasks if t in found] or sorted(found)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        metrics: dict[str, float] = {}
        for key, value in found[name].items():
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if metric in ("alias", "samples", "sample_len") or not math.isfinite(float(value)):
                continue
            metrics[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        out[name] = metrics
    return out


def _one_line(err: BaseException) -> str:
    raw = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
    text = " ".join(str(raw).split()) or type(err).__name__
    return text[:400]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_env_report() -> Iterator[None]:
    """Skip lm-eval's environment report in its results (a `git describe`, which prints "fatal:
    not a git repository" outside one, and `torch.utils.collect_env`: about 4 s of subprocesses
    per call); unitune does not read it."""
    import lm_eval.evaluator as evaluator

    names = [n for n in ("add_env_info", "get_git_commit_hash") if hasattr(evaluator, n)]
    saved = {n: getattr(evaluator, n) for n in names}
    for n in names:
        setattr(evaluator, n, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(evaluator, n, fn)


@contextlib.contextmanager
def _restored_rng() -> Iterator[None]:
    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
