"""Generation-based evaluation of a model: generate on held-out prompts, judge the responses
against the references (win rate), and measure benchmark retention; what `unitune eval` runs.

- `generation_eval(model, tokenizer, prompts, references, judge, ...)`: the win rate of a model in
  memory (the training loop's evaluation calls it), optionally writing the generations.
- `load_target(target)`: a run directory (its `model/`, a full model or a LoRA adapter loaded onto
  the run's base model and merged) or a model name (local directory, hub id, `builtin:`).
- `run_prompts(cfg)`: a run's held-out prompts: `data.pref` (pairs; the chosen response is the
  reference), else `data.sft`; the `eval` file, or the same seeded held-out fraction of `train`
  that training held out (exactly that one when no record was skipped).
- `evaluate(...)`: a loaded target evaluated, `generations.jsonl` and `eval.json` written
  atomically.
- `evaluate_target(target, ...)`: what `unitune eval` and `unitune.evaluate` run: the defaults
  from a run directory's config, the checks before anything loads, then `evaluate`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitune.config import Config, ConfigError, load_config
from unitune.core.io import atomic_write
from unitune.data.holdout import split_holdout
from unitune.eval.generate import (
    EvalPrompt,
    Prompt,
    generate,
    load_prompts,
    write_generations,
)
from unitune.eval.retention import run_retention
from unitune.judges.base import DEFAULT_KEY_ENV, Judge
from unitune.judges.registry import make_judge
from unitune.judges.winrate import WinRate, win_rate
from unitune.models.config import ModelConfig
from unitune.models.errors import ModelLoadError
from unitune.models.load import load_model
from unitune.models.source import check_model_source

if TYPE_CHECKING:
    from unitune.config import EvalConfig

GENERATIONS = "generations.jsonl"
EVAL_JSON = "eval.json"


@dataclass
class Target:
    """A model to evaluate, loaded: where it came from, and its run's config if it is a run."""

    model: Any
    tokenizer: Any
    name: str
    run_dir: Path | None = None
    config: Config | None = None


# --------------------------------------------------------------------------------------------
# In memory (the training loop's evaluation)


def judge_generations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    judge: Judge | str,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = False,
    console: Any = None,
    out_path: str | Path | None = None,
    opponents: Sequence[str] | None = None,
    responses: Sequence[str] | None = None,
) -> tuple[WinRate, list[str]]:
    """Generate (greedy) on `prompts`, judge against `references` (or against `opponents`, the
    references still the judge's yardstick): the win rate and the responses; `responses`: judge
    these instead of generating; `out_path`: also write them as JSONL (prompt, response,
    reference)."""
    if isinstance(judge, str):
        judge = make_judge(judge)
    if responses is None:
        responses = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            console=console,
        )
    responses = list(responses)
    result = win_rate(judge, prompts, responses, references, opponents=opponents)
    if out_path is not None:
        write_generations(out_path, prompts, responses, references)
    return result, responses


def generation_eval(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    judge: Judge | str,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = False,
    out_path: str | Path | None = None,
    opponents: Sequence[str] | None = None,
    responses: Sequence[str] | None = None,
) -> dict[str, float]:
    """`{"win_rate", "win_rate_se"}` of `model`'s greedy responses to `prompts` against
    `references` (or `opponents`, see `judge_generations`) under `judge` (a judge, or a spec such
    as "demo"); the caller's RNG state and the model's train/eval mode are left as they were.
    `out_path`: also write the generations."""
    result, _ = judge_generations(
        model,
        tokenizer,
        prompts,
        references,
        judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        out_path=out_path,
        opponents=opponents,
        responses=responses,
    )
    return {"win_rate": result.win_rate, "win_rate_se": result.win_rate_se}


def judge_for(cfg: EvalConfig, *, label: str = "eval.judge") -> Judge:
    """The judge the `eval:` section names (`judge`, `judge_url`, `judge_key_env`)."""
    return make_judge(cfg.judge, url=cfg.judge_url, key_env=cfg.judge_key_env, label=label)


# --------------------------------------------------------------------------------------------
# A run directory or a model name


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file()


def load_target(target: str, *, label: str = "TARGET", dtype: str = "model") -> Target:
    """Load a run directory's `model/` (a LoRA adapter onto the run's base, merged) or a model
    name; one-line `ModelLoadError` / `ConfigError` otherwise. `dtype` "float32" / "bfloat16":
    the model in that precision, its linear layers packed for the CPU's kernels
    (`models.generation_copy`, inference only); "model": as loaded."""
    check_dtype(dtype)
    check_target(target, label=label)
    if not is_run_dir(target):
        model, tokenizer = load_model(ModelConfig(name=target), label=label)
        return Target(_in_dtype(model, dtype), tokenizer, target)
    run = Path(target)
    cfg = load_config(run / "config.yaml")
    model_dir = run / "model"
    if _is_adapter(model_dir):
        model, tokenizer = _load_adapter(cfg, model_dir, label)
    else:
        model, tokenizer = load_model(_run_model(cfg, model_dir), label=label)
    return Target(_in_dtype(model, dtype), tokenizer, str(run), run, cfg)


DTYPES = ("model", "float32", "bfloat16")


def check_dtype(dtype: str) -> None:
    """A `--dtype` that `load_target` knows, else a one-line `ConfigError`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _in_dtype(model: Any, dtype: str) -> Any:
    if dtype == "model":
        return model
    import torch

    from unitune.models.generation_copy import GenerationCopy

    return GenerationCopy(model, getattr(torch, dtype)).module


def check_target(target: str, *, label: str = "TARGET") -> None:
    """Cheap checks before anything loads: a run directory's config and `model/`, or the model
    name (`check_model_source`)."""
    if not is_run_dir(target):
        check_model_source(ModelConfig(name=target), label=label)
        return
    run = Path(target)
    cfg = load_config(run / "config.yaml")
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"{label} {target!r}: the run directory has no model/ (trained with "
            "train.save_model: false, or not finished)"
        )
    if _is_adapter(model_dir):
        check_model_source(cfg.model.model_copy(update={"lora": None}), label="model.name")
    else:
        check_model_source(_run_model(cfg, model_dir), label=label)


def _run_model(cfg: Config, model_dir: Path) -> ModelConfig:
    """The run's model section pointed at its saved model (no LoRA, no hub revision)."""
    return cfg.model.model_copy(update={"name": str(model_dir), "lora": None, "revision": None})


def _is_adapter(model_dir: Path) -> bool:
    return (model_dir / "adapter_config.json").is_file() and not any(
        model_dir.glob("model*.safetensors")
    )


def _load_adapter(cfg: Config, adapter: Path, label: str) -> tuple[Any, Any]:
    from peft import PeftModel

    base, tokenizer = load_model(cfg.model.model_copy(update={"lora": None}))
    try:
        with warnings.catch_warnings():  # peft probes a deprecated transformers attribute
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
            model = PeftModel.from_pretrained(base, str(adapter), use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(
            f"{label} {str(adapter)!r}: the LoRA adapter cannot be loaded: {err}"
        ) from None
    return model.merge_and_unload(), tokenizer


def run_prompts(cfg: Config, *, max_samples: int | None = None) -> list[EvalPrompt]:
    """A run's held-out prompts and references: preference pairs (`data.pref`) when it has them,
    else its SFT data; the `eval` file, or the held-out part of `train` as training split it."""
    from unitune.data import DataError

    slots = [("pref", "pairs"), ("sft", "demonstrations")]
    problems = []
    for slot, kind in slots:
        dcfg = getattr(cfg.data, slot)
        if dcfg is None:
            continue
        common = {
            "kind": kind,
            "split": dcfg.split,
            "columns": dcfg.columns,
            "on_bad_record": cfg.data.on_bad_record,
        }
        try:
            if dcfg.eval is not None:
                return load_prompts(dcfg.eval, max_samples=max_samples, **common)
            every = load_prompts(dcfg.train, **common)
        except DataError as err:
            if slot == "pref" and "unpaired feedback" in str(err):
                problems.append(str(err))
                continue  # KTO-style data: try the SFT slot
            raise
        if len(every) < 2:
            return every[:max_samples]
        _, held = split_holdout(every, dcfg.eval_fraction, cfg.train.seed)
        return held[:max_samples] if max_samples is not None else held
    raise ConfigError(
        "the run has no preference pairs or SFT data to take prompts from"
        + (f" ({problems[0]})" if problems else "")
        + "; give --prompts FILE"
    )


# --------------------------------------------------------------------------------------------
# The whole evaluation, as `unitune eval` runs it


def evaluate(
    target: Target,
    out_dir: str | Path,
    *,
    prompts: Sequence[EvalPrompt] | None,
    judge: Judge | None,
    tasks: Sequence[str] = (),
    limit: int | float | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = False,
    console: Any = None,
    prompts_source: str | None = None,
) -> dict[str, Any]:
    """Generate and judge (when `prompts` and `judge` are given), run the retention `tasks`,
    write `generations.jsonl` and `eval.json` into `out_dir`; return eval.json's content."""
    out = Path(out_dir)
    report: dict[str, Any] = {
        "win_rate": None,
        "win_rate_se": None,
        "wins": None,
        "ties": None,
        "losses": None,
        "n": 0,
        "judge": None,
    }
    if prompts and judge is not None:
        result, _ = judge_generations(
            target.model,
            target.tokenizer,
            [p.prompt for p in prompts],
            [p.reference for p in prompts],
            judge,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            console=console,
            out_path=out / GENERATIONS,
        )
        report.update(result.as_dict())
    report["retention"] = (
        run_retention(target.model, target.tokenizer, list(tasks), limit, batch_size=batch_size)
        if tasks
        else {}
    )
    report["target"] = target.name
    report["prompts"] = prompts_source
    report["max_new_tokens"] = max_new_tokens
    atomic_write(out / EVAL_JSON, json.dumps(report, indent=2) + "\n")
    return report


def evaluate_target(
    target: str | Path,
    *,
    prompts: str | Path | None = None,
    judge: str | None = None,
    judge_url: str | None = None,
    judge_key_env: str | None = None,
    judge_trust_remote_code: bool = False,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    console: Any = None,
    dtype: str = "model",
) -> tuple[dict[str, Any], Path]:
    """`unitune eval TARGET`: resolve what to evaluate on and with (a run directory's config
    gives the defaults: its held-out data, judge, retention tasks and limit), check the target
    and the judge before loading anything, then `evaluate`. Returns eval.json's content and the
    directory it was written to (default `TARGET/eval`). Every failure is a one-line
    `ConfigError`, `DataError`, `ModelLoadError`, `JudgeError`, `GenerationError` or
    `RetentionError`."""
    check_dtype(dtype)
    target = str(target)
    run = is_run_dir(target)
    check_target(target)
    cfg = load_config(Path(target) / "config.yaml") if run else None
    ecfg = cfg.eval if cfg is not None else None
    task_list = list(tasks) if tasks is not None else []
    if tasks is None and ecfg is not None:
        task_list = list(ecfg.retention_tasks)
    if limit is None and ecfg is not None and ecfg.retention_limit is not None:
        limit = ecfg.retention_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    new_tokens = max_new_tokens or (ecfg.max_new_tokens if ecfg is not None else 48)
    if prompts is not None:
        if not Path(prompts).exists():
            raise ConfigError(f"--prompts {prompts}: no such file")
        items = load_prompts(prompts, max_samples=max_samples)
        source = str(prompts)
    elif cfg is not None:
        items = run_prompts(cfg, max_samples=max_samples)
        source = "the run's held-out data"
    elif task_list:
        items, source = None, None
    else:
        raise ConfigError(
            f"TARGET {target!r} is not a run directory: give --prompts FILE (or --tasks)"
        )
    if out is None and not run:
        raise ConfigError(
            f"TARGET {target!r} is not a run directory: give the output directory, -o DIR"
        )
    out_dir = Path(out) if out is not None else Path(target) / "eval"
    the_judge = None
    if items:
        spec = judge or (ecfg.judge if ecfg is not None else "demo")
        url = judge_url or (ecfg.judge_url if ecfg is not None else None)
        key_env = judge_key_env or (ecfg.judge_key_env if ecfg is not None else DEFAULT_KEY_ENV)
        the_judge = make_judge(
            spec, url=url, key_env=key_env, trust_remote_code=judge_trust_remote_code,
            label="--judge",
        )  # fmt: skip
        if hasattr(the_judge, "check"):
            the_judge.check()
    report = evaluate(
        load_target(target, dtype=dtype), out_dir, prompts=items, judge=the_judge, tasks=task_list,
        limit=limit, max_new_tokens=new_tokens, batch_size=batch_size, progress=progress,
        console=console, prompts_source=source,
    )  # fmt: skip
    return report, out_dir
