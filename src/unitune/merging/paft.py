"""PAFT (arXiv 2406.17923): SFT and preference trained in parallel from one base, then merged.

The `parallel` job (`job: parallel`, options in the `parallel:` section) is two ordinary
single-objective runs from the same base: the SFT branch, with an L1 penalty on its delta from the
base (`parallel.l1`) to make that delta sparse, and the preference branch as it is. The two saved
models are merged with `parallel.merge` (`merge.py`), and the merged model is evaluated on both
held-out objectives against the base, like every other run. The run directory has the usual
`metrics.jsonl` and `summary.json` (its `job` and its `schedule` are both "parallel"), so
`parallel` sits in the same table and plot as the joint schedules; its branches are sub-runs in
`sft/` and `pref/`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import PartialState
from rich.console import Console
from rich.table import Table

from unitune.config import Config, MergeConfig, ParallelConfig, dump_config
from unitune.core import usage
from unitune.core.io import atomic_write
from unitune.eval.heldout import Ideal
from unitune.merging.l1 import DeltaL1
from unitune.merging.merge import merge
from unitune.merging.readers import stored_dtypes
from unitune.models.config import ModelConfig
from unitune.models.load import load_model
from unitune.models.save import save_model
from unitune.models.source import model_dir
from unitune.training import checkpoint
from unitune.training.calibration import resolve_ideal
from unitune.training.evaluator import Evaluator, retention
from unitune.training.generation import Generation
from unitune.training.loop import train
from unitune.training.policy import Penalty, Policy, PolicyLogps
from unitune.training.reference_set import References
from unitune.training.rundir import run_summary
from unitune.training.session import Session


def branch_costs(branches: Iterable[dict], device: torch.device) -> dict:
    """Both branches' tokens per training second, and the peaks over the whole job: each branch
    measured its own (`usage.reset_peaks`), the merge and the merged evaluation count since the
    second branch started."""
    branches = list(branches)
    tokens = sum(s.get("tokens", 0) for s in branches)
    seconds = sum(s["train_s"] - s.get("eval_s", 0.0) for s in branches)
    now = usage.costs(tokens, seconds, device)
    for key in ("peak_rss_mb", "peak_accelerator_mb"):
        seen = [v for v in (now[key], *(s.get(key) for s in branches)) if v is not None]
        now[key] = max(seen) if seen else None
    return now


def train_parallel(
    cfg: Config,
    *,
    console: Console | None = None,
    progress: bool = True,
    ideal: Ideal | None = None,
    resume: bool | str | Path = False,
) -> dict:
    """Run both branches, merge, evaluate; returns the summary written to summary.json."""
    console = console or Console()
    t_start = time.time()
    # several processes: each branch trains on all of them; the merge and every file come from
    # the main process while the others wait; all of them evaluate the merged model (sharded)
    procs = PartialState()
    if not procs.is_main_process:
        console.quiet = True
    sc, pc, out = cfg.schedule, cfg.parallel, Path(cfg.output_dir)
    star = ideal if ideal is not None else resolve_ideal(cfg, console)
    name = cfg.name or "parallel"
    if procs.is_main_process:  # the job's own resolved config, as every run directory has
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", dump_config(cfg))

    branches: dict[str, dict] = {}
    for kind in ("sft", "pref"):
        sub = cfg.model_copy(deep=True)
        sub.name = f"{name}: {kind} branch"
        sub.job, sub.parallel = "train", ParallelConfig()  # an ordinary run
        sub.schedule = sc.for_schedule(kind, l1=pc.l1 if kind == "sft" else 0.0)
        sub.train = cfg.train.model_copy(update={"save_model": True})
        sub.eval = cfg.eval.model_copy(update={"retention_tasks": []})  # the merged model's only
        sub.output_dir = str(out / kind)
        done = out / kind / "summary.json"
        if resume and done.exists() and (out / kind / "model").exists():
            console.log(f"parallel: {kind} branch already finished ({done})")
            branches[kind] = json.loads(done.read_text())
            continue
        again = bool(resume) and checkpoint.list_checkpoints(out / kind) != []
        console.log(f"parallel: {kind} branch from the base for {cfg.train.max_steps} steps")
        branches[kind] = train(
            sub, star, console=console, progress=progress, resume=again, penalty=l1_penalty(sub)
        )

    models = [out / kind / "model" for kind in ("sft", "pref")]
    tol = pc.sparsity_tol if pc.sparsity_tol is not None else cfg.train.lr
    if procs.is_main_process:
        merge_cfg = MergeConfig(
            base=str(merge_base(cfg, out / "base")),
            models=[
                {"path": str(m), "weight": w} for m, w in zip(models, pc.merge.weights, strict=True)
            ],
            output=str(out / "model"),
            **pc.merge.model_dump(exclude={"weights"}),
        )
        console.log(f"parallel: merging the branches ({pc.merge.method})")
        report = merge(merge_cfg, console=console, progress=progress, sparsity_tol=tol)
    procs.wait_for_everyone()
    console.log("parallel: evaluating the merged model")
    t_eval = time.time()
    merged, retention = evaluate_model(cfg, out / "model", star, console)
    eval_s = time.time() - t_eval + sum(s.get("eval_s", 0.0) for s in branches.values())
    if not procs.is_main_process:  # the main process writes the summary
        procs.wait_for_everyone()
        return json.loads((out / "summary.json").read_text())
    sparsity = {
        kind: {k: v for k, v in r.items() if k not in ("path", "kind", "weight")}
        for kind, r in zip(("sft", "pref"), report["models"], strict=True)
    }

    base = _first_eval(out / "sft")
    steps = cfg.train.max_steps
    final = {"type": "eval", "step": steps, **merged, "steps_sft": steps, "steps_pref": steps}
    final["elapsed_s"] = round(time.time() - t_start, 2)
    with (out / "metrics.jsonl").open("w") as log:
        for rec in (base, final):
            log.write(json.dumps(rec) + "\n")
    if not cfg.train.save_model:
        for m in (*models, out / "model", out / "base"):
            shutil.rmtree(m, ignore_errors=True)
    summary = run_summary(
        cfg,
        star,
        final,
        wall_s=time.time() - t_start,
        train_s=sum(s["train_s"] for s in branches.values()),
        eval_s=round(eval_s, 2),  # the branches' evaluations and the merged model's
        **branch_costs(branches.values(), procs.device),
        steps={"sft": steps, "pref": steps},
        data=branches["sft"]["data"],
        base={k: v for k, v in base.items() if k != "type"},
        branches={kind: s["final"] for kind, s in branches.items()},
        **({"retention": retention} if retention else {}),
        sparsity=sparsity,
        l1=pc.l1,
        sparsity_tol=tol,
        merge={**pc.merge.model_dump(mode="json"), "seconds": report.get("seconds")},
        **{k: branches["sft"][k] for k in ("world_size", "engine", "global_batch")},
    )
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    console.print(parallel_table(summary))
    procs.wait_for_everyone()
    return summary


def l1_penalty(cfg: Config) -> Penalty | None:
    """PAFT's L1 penalty on the SFT objective's delta from the starting weights, weighted by
    `schedule.l1` and logged as `l1_norm`; None without one."""
    l1 = cfg.schedule.l1
    return Penalty("sft", l1, "l1_norm", DeltaL1) if l1 > 0 else None


def merge_base(cfg: Config, cast_dir: Path) -> Path:
    """The base the branches' deltas are taken from: the base model's directory, or, when the
    run's `model.dtype` differs from the dtype stored there, the base cast to `model.dtype` and
    saved to `cast_dir` (the branches started from that cast, so their deltas are exact)."""
    base_dir = model_dir(cfg.model.name, cfg.model.revision)
    if stored_dtypes(base_dir) == {getattr(torch, cfg.model.dtype)}:
        return base_dir
    model, tokenizer = load_model(cfg.model.model_copy(update={"lora": None}))
    return save_model(model, tokenizer, cast_dir)


def evaluate_model(
    cfg: Config, path: Path, star: Ideal, console: Console
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Held-out metrics of the model saved at `path`, against the base's reference log-probs
    (as every run's metrics are), on the data and objectives of `cfg`; and its retention
    (`eval.retention_tasks`, `{}` without)."""
    ev = cfg.model_copy(deep=True)
    ev.model = cfg.model.model_copy(update={"lora": None})  # the base, for its reference
    ev.job, ev.schedule = "train", cfg.schedule.for_schedule("mix", l1=0.0)
    session = Session(ev, console)
    generation = Generation(session) if ev.eval.generate else None
    refs = References(session)
    model, _ = load_model(ModelConfig(name=str(path), dtype=cfg.model.dtype))
    tc = cfg.train
    module = PolicyLogps(model.to(session.device), tc.logprob_chunk_size, packed=tc.packing)
    evaluator = Evaluator(Policy(session, module, refs), star, generation)
    return evaluator.evaluate(), retention(session, module)


def _first_eval(run_dir: Path) -> dict:
    with (run_dir / "metrics.jsonl").open() as f:
        for line in f:
            rec = json.loads(line)
            if rec["type"] == "eval":
                return rec
    raise ValueError(f"{run_dir}: no eval record")


def parallel_table(summary: dict) -> Table:
    """Base, each branch and the merged model on both held-out objectives, with the deltas'
    sparsity."""
    table = Table(title=f"{summary['name']}: PAFT branches and merge (held-out, lower is better)")
    for col in ("model", "f_sft", "f_pref", "reward acc", "delta sparsity", "delta L1"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    sp = summary["sparsity"]
    rows = [
        ("base", summary["base"], None),
        ("sft branch", summary["branches"]["sft"], sp["sft"]),
        ("pref branch", summary["branches"]["pref"], sp["pref"]),
        (f"merged ({summary['merge']['method']})", summary["final"], None),
    ]
    for label, ev, s in rows:
        table.add_row(
            label,
            f"{ev['f_sft']:.4f}",
            f"{ev['f_pref']:.4f}",
            f"{ev['reward_acc']:.2f}" if "reward_acc" in ev else "-",
            f"{s['sparsity']:.1%}" if s else "-",
            f"{s['l1']:.4g}" if s else "-",
        )
    return table
