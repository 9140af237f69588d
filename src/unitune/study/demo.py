"""The embedded default job: every joint schedule on the shipped demo data, compared.

Runs `sequential`, `mix`, `alright`, `maxright` and `parallel` (PAFT: two branches, then a merge)
at the same `lam` with equal data budgets on SmolLM2-135M-Instruct (embedded), then prints a
comparison table and writes the trajectory plot.

`online=True` (`unitune demo --online`): first a Bradley-Terry reward model trained on the demo
pairs from the same model (`demo_reward_config`, reused while its config is unchanged), then the
joint schedules with SFT on the demo's SFT data and online UNA on the pairs' prompts, scored by
that reward model (`rm:<out>/reward-model/model`); f_pref is minus the held-out mean reward.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from unitune.config import Config, parse_config
from unitune.study.plots import plot_runs

DEMO_DATA = Path(__file__).parent / "demo_data"
SCHEDULES = ("sequential", "mix", "alright", "maxright", "parallel")
# parallel: PAFT's L1 on the SFT delta and the merge, the best of a small sweep on the demo data
# (README, "Parallel training and merging")
DEMO_L1 = 1e-3
DEMO_MERGE = {"method": "ties", "density": 0.2, "weights": [1.0, 0.25]}


@dataclass(frozen=True)
class Preset:
    """How long the demo trains and how much it evaluates. `quick` (the default) fits a laptop
    CPU without fast bf16 in about 10 minutes (README, "What the demo shows"); `full` is the
    statistically stronger comparison: more steps, every held-out record, more evaluations."""

    steps: int
    evals: int  # evaluations after the start (the start's own evaluation costs no forward)
    eval_samples: int | None  # held-out records per set (None: all 64)
    generate_samples: int  # held-out prompts generated on and judged at each evaluation


PRESETS = {
    "quick": Preset(steps=20, evals=1, eval_samples=32, generate_samples=16),
    "full": Preset(40, 4, None, 32),
}
# the judge and the retention task the demo reports with, both offline: the demo data's
# preferred style ("Ahoy! <answer>, matey!", judges.demo_score, scored against the held-out
# chosen responses) and the shipped multiple-choice task (retention.py). The win rate is against
# the starting model's own responses: the chosen references themselves get the judge's top score
# by construction, so against them a model could at best tie.
DEMO_JUDGE = "demo"
DEMO_RETENTION = ["unitune_mc"]
# the online demo: the per-step schedules (PAFT's parallel job trains offline only), the
# generation settings of examples/online-una.yaml (the UNA authors' temperature; the demo's
# chosen answers are at most 27 tokens), and the reward model's training length (its held-out
# pairwise accuracy reaches 1.00 within about 10 steps on SmolLM2-135M: README)
ONLINE_SCHEDULES = ("sequential", "mix", "alright", "maxright")
DEMO_ONLINE = {"num_generations": 1, "temperature": 0.7, "max_new_tokens": 32,
               "missing_eos_penalty": 1.0, "score_map": "sigmoid"}  # fmt: skip
REWARD_MODEL_STEPS = 20
# the report's tables the demo prints over several seeds (all of them are in the HTML report)
SHOWN = ("Final held-out metrics", "Ideal distance")


def default_precision() -> str:
    """bf16 autocast where bf16 is measurably fast here, else fp32 ("no").

    CUDA: where the GPU supports bf16. CPU: a CPU may have bf16 instructions and still run bf16
    matmuls no faster than fp32 (AVX2-only machines emulate them), so this times the model's
    typical GEMM (a few hundred rows by 576 x 1536, SmolLM2-135M's MLP) in both precisions, on
    the threads torch will train with, and picks bf16 when it is at least 1.3x faster.
    `bf16_speedup()` gives the measured ratio."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if bf16_speedup() >= 1.3 else "no"


def bf16_speedup(rows: int = 512, reps: int = 6) -> float:
    """fp32 time over bf16 time of a [rows, 576] x [576, 1536] matmul on this CPU (best of
    `reps`, after a warm-up); about 0.1 s in all."""
    import time

    import torch

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(rows, 576, dtype=dtype)
        b = torch.randn(576, 1536, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def demo_config(
    schedule: str,
    *,
    model: str = "builtin:smollm2-135m",
    out_dir: Path = Path("runs/demo"),
    lam: float = 0.5,
    steps: int = 40,
    batch_size: int = 4,
    sft: str = "sft",
    pref: str = "dpo",
    seed: int = 0,
    precision: str | None = None,
    evals: int = 4,
    eval_samples: int | None = None,
    generate_samples: int = 16,
    name: str | None = None,
    reward_model: Path | None = None,
    pref_options: dict | None = None,
    num_generations: int | None = None,
    ideal: str = "calibrate",
) -> Config:
    """Equal budgets: every schedule draws one SFT and one preference batch per step, so each
    sees exactly the first `steps * batch_size` records of both training sets, once (`parallel`'s
    branches each see their own set once, in `steps` steps each). With `reward_model` the
    preference slot trains online (`pref` an online objective): one sample per prompt of the
    pairs, scored by `rm:<reward_model>`; its held-out prompts are those the win rate is
    measured on. `pref_options`: the preference objective's options; `num_generations`: samples
    per prompt online (default 1); `ideal`: the schedule's ideal point (`calibrate` or `zero`)."""
    n = steps * batch_size
    name = name or schedule
    online = {}
    if reward_model:
        gens = {"num_generations": num_generations} if num_generations else {}
        online = {"online": {"rewards": [f"rm:{reward_model}"], **DEMO_ONLINE, **gens}}
    return parse_config(
        {
            "name": name,
            "model": {"name": model},
            "data": {
                "sft": {
                    "train": str(DEMO_DATA / "sft_train.jsonl"),
                    "eval": str(DEMO_DATA / "sft_eval.jsonl"),
                    "max_samples": n,
                    "eval_max_samples": eval_samples,
                },
                "pref": {
                    "train": str(DEMO_DATA / "pref_train.jsonl"),
                    "eval": str(DEMO_DATA / "pref_eval.jsonl"),
                    "max_samples": n,
                    "eval_max_samples": generate_samples if reward_model else eval_samples,
                },
                "max_length": 128,
            },
            "objectives": {"sft": {"name": sft}, "pref": {"name": pref, **(pref_options or {})}},
            # `parallel` is a job (PAFT) with its own section, the others per-step schedules
            **(
                {"job": "parallel", "parallel": {"l1": DEMO_L1, "merge": DEMO_MERGE}}
                if schedule == "parallel"
                else {}
            ),
            "schedule": {
                **({"name": schedule} if schedule != "parallel" else {}),
                "lam": lam,
                **({"k": 10} if schedule == "maxright" else {}),
                "ideal": ideal,
                **({"calibration_steps": max(steps // 2, 1)} if ideal == "calibrate" else {}),
            },
            "train": {
                "max_steps": steps,
                "batch_size": batch_size,
                "lr": 5e-5,
                "seed": seed,
                "eval_every": max(steps // evals, 1),
                "eval_batch_size": 16,
                "mixed_precision": precision or default_precision(),
                "save_model": False,
            },
            "eval": {
                "generate": True,
                "judge": DEMO_JUDGE,
                "win_rate_against": "base",
                "generate_samples": generate_samples,
                "max_new_tokens": 32,  # every held-out chosen response is at most 27 tokens
                "retention_tasks": DEMO_RETENTION,
            },
            **online,
            "output_dir": str(out_dir / name),
        },
        source="demo",
    )


def demo_reward_config(*, model: str, out_dir: Path, steps: int = REWARD_MODEL_STEPS) -> Config:
    """The online demo's reward model: a Bradley-Terry head on `model`, trained on the demo
    pairs (examples/reward-model.yaml, shorter), saved to `<out_dir>/reward-model/model`."""
    return parse_config(
        {
            "name": "reward-model",
            "job": "reward_model",
            "model": {"name": model},
            "data": {
                "pref": {
                    "train": str(DEMO_DATA / "pref_train.jsonl"),
                    "eval": str(DEMO_DATA / "pref_eval.jsonl"),
                    "eval_max_samples": 32,
                },
                "max_length": 128,
            },
            "train": {
                "max_steps": steps,
                "batch_size": 8,
                "lr": 1e-5,
                "seed": 0,
                "eval_every": max(steps // 2, 1),
                "eval_batch_size": 16,  # fp32: the reward-model job has no mixed precision
            },
            "output_dir": str(out_dir / "reward-model"),
        },
        source="demo",
    )


def demo_reward_model(cfg: Config, console: Console, progress: bool = True) -> Path:
    """Train the demo's reward model, or reuse the one `cfg.output_dir` holds when it was
    trained to completion from the same config; returns its model directory."""
    from unitune.config import dump_config
    from unitune.jobs import train as jobs_train

    out = Path(cfg.output_dir)
    done = (out / "summary.json").exists() and (out / "model" / "config.json").exists()
    if done and (out / "config.yaml").read_text() == dump_config(cfg):
        final = json.loads((out / "summary.json").read_text())["final"]
        console.log(f"reward model: {out / 'model'} (trained earlier; held-out pairwise "
                    f"accuracy {final['accuracy']:.2f})")  # fmt: skip
        return out / "model"
    if out.exists():  # a stale or unfinished one: trained again from the start
        shutil.rmtree(out)
    console.log(f"reward model: {cfg.model.name} on the demo pairs, {cfg.train.max_steps} steps")
    summary = jobs_train(cfg, console=console, progress=progress)
    console.log(f"reward model: held-out pairwise accuracy {summary['final']['accuracy']:.2f}, "
                f"margin {summary['final']['margin']:.2f}")  # fmt: skip
    return out / "model"


def comparison_tables(summaries: list[dict]) -> list[Table]:
    """Two tables, each within 80 columns (a terminal, a log file): the held-out losses, then the
    evaluation and the cost. One row per run; a `parallel` run adds the base and its two branches
    under its row."""
    title = "unitune demo"
    # an online preference slot has no held-out pairs: its held-out mean reward instead
    online = any("eval_reward" in s["final"] for s in summaries)
    third, key = ("held-out\nreward", "eval_reward") if online else ("reward\nacc", "reward_acc")
    losses = _table(
        f"{title}: held-out losses (lower is better)",
        ("schedule", "lam", "f_sft", "f_pref", third, "ideal\ndist.", "steps\nsft/pref"),
    )
    cost = _table(
        f"{title}: evaluation and cost", ("schedule", "win rate", "retention", "wall s", "eval s")
    )

    def row(label: str, f: dict, s: dict | None, steps: str) -> None:
        losses.add_row(
            label,
            f"{s['lam']:.2f}" if s else "",
            f"{f['f_sft']:.4f}",
            f"{f['f_pref']:.4f}",
            f"{f[key]:.2f}" if key in f else "",
            f"{f['ideal_distance']:.4f}" if "ideal_distance" in f else "",
            steps,
        )
        cost.add_row(
            label,
            f"{f['win_rate']:.2f}" if "win_rate" in f else "",
            _retention(s),
            f"{s['wall_s']:.0f}" if s else "",
            f"{s['eval_s']:.0f}" if s and "eval_s" in s else "",
        )

    for s in summaries:
        row(s["name"], s["final"], s, f"{s['steps']['sft']}/{s['steps']['pref']}")
        if s["schedule"] == "parallel":  # a parallel job's summary (rundir.run_summary)
            n = s["steps"]
            for kind, f in s["branches"].items():
                sp = s["sparsity"][kind]["sparsity"]
                steps = f"{n['sft']}/0" if kind == "sft" else f"0/{n['pref']}"
                row(f"  {kind} ({sp:.0%} sparse)", f, None, steps)
            row("  base", s["base"], None, "0/0")
    return [losses, cost]


def _table(title: str, cols: tuple[str, ...]) -> Table:
    """A table with no vertical rules, so that its columns fit 80 characters; `steps` is
    SFT/preference steps."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title_justify="left",
        collapse_padding=True,
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "schedule" else "right", no_wrap=True)
    return table


def start_retention(cfg: Config) -> str:
    """The starting model's score on the demo's retention task, the yardstick of the column, in
    the runs' precision."""
    import torch

    from unitune.eval.retention import run_retention
    from unitune.models.load import load_model

    model, tokenizer = load_model(cfg.model)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=half or torch.float32, enabled=half is not None):
        scores = run_retention(model.to(device), tokenizer, DEMO_RETENTION)[DEMO_RETENTION[0]]
    return f"{DEMO_RETENTION[0]} acc {scores['acc']:.2f}"


def _retention(summary: dict | None) -> str:
    """The demo's retention figure: accuracy on the shipped multiple-choice task."""
    acc = ((summary or {}).get("retention") or {}).get(DEMO_RETENTION[0], {}).get("acc")
    return f"{acc:.2f}" if acc is not None else ""


def run_demo(
    *,
    model: str = "builtin:smollm2-135m",
    out_dir: Path = Path("runs/demo"),
    schedules: tuple[str, ...] = SCHEDULES,
    lam: float = 0.5,
    steps: int | None = None,
    sft: str = "sft",
    pref: str = "dpo",
    precision: str | None = None,
    preset: str = "quick",
    seeds: int = 1,
    online: bool = False,
    reward_model_steps: int = REWARD_MODEL_STEPS,
    console: Console | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every schedule (over `seeds` seeds: 0, 1, ...), then `unitune report` on their runs: the
    table (mean ± std over seeds with more than one), the win rate and retention columns, the
    Pareto plot and the HTML report (`out_dir/report/index.html`). `online`: the preference slot
    (`pref`, an online objective) trains on the policy's own samples scored by a reward model
    the demo trains first on the demo pairs (`reward_model_steps` steps)."""
    from unitune.jobs import train as jobs_train
    from unitune.study.report import build_report, rich_tables
    from unitune.training.calibration import calibrate

    console = console or Console()
    chosen = PRESETS[preset]
    precision = precision or default_precision()
    mode = f", online ({pref})" if online else ""
    shown = {"no": "fp32"}.get(precision, precision)
    console.log(f"demo: {preset} preset, precision {shown}, {seeds} seed(s){mode}")
    rm = None
    if online:
        rm_cfg = demo_reward_config(model=model, out_dir=out_dir, steps=reward_model_steps)
        rm = demo_reward_model(rm_cfg, console, progress=progress)
    cfgs = [
        demo_config(
            s,
            model=model,
            out_dir=out_dir,
            lam=lam,
            steps=steps or chosen.steps,
            sft=sft,
            pref=pref,
            seed=seed,
            precision=precision,
            evals=chosen.evals,
            eval_samples=chosen.eval_samples,
            generate_samples=chosen.generate_samples,
            name=s if seeds == 1 else f"{s}-seed{seed}",
            reward_model=rm,
        )  # fmt: skip
        for s in schedules
        for seed in range(seeds)
    ]
    # one ideal point for every run: the problem's, from seed 0's calibration (cached)
    star = calibrate(cfgs[0], console, progress=progress)
    summaries = [jobs_train(c, console=console, progress=progress, ideal=star) for c in cfgs]
    if seeds == 1:
        for table in comparison_tables(summaries):
            console.print(table)
    console.print(f"retention of the starting model: {start_retention(cfgs[0])}")
    files = plot_runs(
        [Path(c.output_dir) for c in cfgs],
        out_dir / "trajectories",
        title=f"{model}: SFT ({sft}) vs preference ({pref}), lam={lam}",
    )
    console.print("plot: " + ", ".join(str(f) for f in files))
    report = build_report([Path(c.output_dir) for c in cfgs], out_dir / "report")
    if seeds > 1:  # the means with their spread, and who is nearest the ideal point
        for table in rich_tables([t for t in report.tables if t.title.startswith(SHOWN)]):
            console.print(table)
    console.print(f"report (tables, Pareto front, plots, every run's config): {report.index}")
    return summaries
