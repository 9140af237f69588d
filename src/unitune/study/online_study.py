"""The online study (`unitune demo --online-study`): online UNA, online DPO and GRPO against
offline UNA and DPO, each alone and jointly with SFT under ALRIGHT and mix, over seeds, on the
embedded default with the demo's reward model.

Every arm trains `steps` steps of `batch_size` completions (online: prompts x generations, so
GRPO's 4 samples of one prompt cost what online UNA's 4 prompts cost) or pairs (offline), so the
online arms generate about the same number of tokens (the cost table counts them). What is
compared is what every arm has, measured the same way:

- `f_sft`: the held-out SFT loss (does SFT stay learned?);
- held-out reward: the demo reward model's mean score of the greedy answers to the held-out
  prompts at the last step (the win-rate evaluation's own generations, scored afterwards), the
  same yardstick for the arms that trained on it and for the offline ones that never saw it;
- win rate: the demo judge's, against the starting model's answers;
- retention: accuracy on the shipped multiple-choice task;
- cost: tokens generated in training, wall seconds.

ALRIGHT trains one objective per step and mix both, so at equal steps ALRIGHT has spent less;
the offline arms also run ALRIGHT at the cost of mix (`alright@cost`: its steps scaled by the
measured ratio of mix's to ALRIGHT's mean step time in the same study). Means ± std over seeds;
the Pareto front of (f_sft, held-out reward) over the arms is drawn in `front.png` and marked in
the table. Everything is written to `<out>/study.md`, `study.json` and `front.png`, beside the
usual HTML report over every run.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from unitune.study.demo import (
    PRESETS,
    REWARD_MODEL_STEPS,
    default_precision,
    demo_config,
    demo_reward_config,
    demo_reward_model,
)


@dataclass(frozen=True)
class Arm:
    """One method: the preference objective, its options, samples per prompt (None: offline)."""

    objective: str
    options: dict
    generations: int | None


ARMS: dict[str, Arm] = {
    "una_online/init": Arm("una_online", {"reference": "init"}, 1),
    "una_online/rollout": Arm("una_online", {"reference": "rollout"}, 1),
    "online_dpo": Arm("online_dpo", {}, 2),
    "grpo": Arm("grpo", {}, 4),
    "una_pair": Arm("una_pair", {}, None),
    "dpo": Arm("dpo", {}, None),
}
STUDY_SCHEDULES = ("pref", "alright", "mix")  # pref: the preference objective alone
EQUAL_COST = "alright@cost"


def study_runs(
    *,
    model: str,
    out_dir: Path,
    arms: list[str],
    schedules: tuple[str, ...],
    steps: int,
    seeds: int,
    precision: str,
    reward_model: Path,
    evals: int = 1,
    generate_samples: int = 16,
    eval_samples: int | None = 32,
    alright_steps: int | None = None,
) -> list[tuple[str, str, int, Any]]:
    """(arm, schedule, seed, config) of every run; `alright_steps`: the equal-cost ALRIGHT runs
    of the offline arms (schedule `alright@cost`)."""
    runs = []
    plan = [(s, steps) for s in schedules]
    if alright_steps is not None:
        plan.append((EQUAL_COST, alright_steps))
    for name in arms:
        arm = ARMS[name]
        for schedule, n in plan:
            if schedule == EQUAL_COST and arm.generations is not None:
                continue
            for seed in range(seeds):
                label = f"{name.replace('/', '-')}.{schedule.replace('@', '-at-')}.seed{seed}"
                cfg = demo_config(
                    "alright" if schedule == EQUAL_COST else schedule,
                    model=model, out_dir=out_dir / "runs", steps=n, pref=arm.objective,
                    seed=seed, precision=precision, evals=evals, eval_samples=eval_samples,
                    generate_samples=generate_samples, name=label,
                    reward_model=reward_model if arm.generations else None,
                    pref_options=arm.options, num_generations=arm.generations, ideal="zero",
                )  # fmt: skip
                runs.append((name, schedule, seed, cfg))
    return runs


def heldout_reward(run_dir: Path, reward_model: Path) -> float:
    """The reward model's mean score of the run's last held-out generations."""
    files = sorted((run_dir / "generations").glob("step-*.jsonl"))
    if not files:
        return math.nan
    rows = [json.loads(x) for x in files[-1].read_text().splitlines() if x.strip()]
    rm = _reward_model(str(reward_model))
    scores = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows],
                      [r.get("reference") or "" for r in rows])  # fmt: skip
    return float(sum(scores) / len(scores))


@functools.cache
def _reward_model(path: str) -> Any:
    """The study's reward model, loaded once for all its runs."""
    from unitune.judges.reward_model import load_reward_model

    return load_reward_model(path)


def run_figures(
    run_dir: Path, summary: dict, reward_model: Path, per_generation: int
) -> dict[str, float]:
    """What the study compares, for one finished run; `per_generation`: completions sampled per
    generation batch."""
    final = summary["final"]
    tokens = 0.0
    step_s = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("type") != "train":
            continue
        step_s.append(row.get("step_s", 0.0))
        if "completions/mean_length" in row:
            tokens += row["completions/mean_length"] * per_generation
    retention = ((summary.get("retention") or {}).get("unitune_mc") or {}).get("acc", math.nan)
    return {
        "f_sft": final.get("f_sft", math.nan),
        "heldout_reward": heldout_reward(run_dir, reward_model),
        "win_rate": final.get("win_rate", math.nan),
        "retention": retention,
        "gen_tokens": tokens,
        "wall_s": summary.get("wall_s", math.nan),
        "step_s": statistics.mean(step_s) if step_s else math.nan,
    }


def aggregate(results: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (arm, schedule), and whether it is on the Pareto front of
    (lower f_sft, higher held-out reward)."""
    keys = sorted({(r["arm"], r["schedule"]) for r in results}, key=_order)
    rows = []
    for arm, schedule in keys:
        mine = [r for r in results if r["arm"] == arm and r["schedule"] == schedule]
        row: dict[str, Any] = {"arm": arm, "schedule": schedule, "seeds": len(mine)}
        for k in ("f_sft", "heldout_reward", "win_rate", "retention", "gen_tokens", "wall_s"):
            values = [r[k] for r in mine if not math.isnan(r[k])]
            row[k] = statistics.mean(values) if values else math.nan
            row[k + "_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        rows.append(row)
    for row in rows:
        row["front"] = not any(
            o is not row
            and o["f_sft"] <= row["f_sft"]
            and o["heldout_reward"] >= row["heldout_reward"]
            and (o["f_sft"] < row["f_sft"] or o["heldout_reward"] > row["heldout_reward"])
            for o in rows
        )
    return rows


def _order(key: tuple[str, str]) -> tuple[int, int]:
    arm, schedule = key
    order = [*STUDY_SCHEDULES, EQUAL_COST]
    return (list(ARMS).index(arm), order.index(schedule))


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:{fmt}}" + ("" if math.isnan(std) else f" ± {std:{fmt}}")


def markdown(rows: list[dict], meta: dict) -> str:
    """The study's table (markdown)."""
    lines = [
        f"{meta['model']}, {meta['steps']} steps of {meta['batch']} completions or pairs, "
        f"{meta['seeds']} seed(s) (mean ± std), precision {meta['precision']}; {meta['cpu']}. "
        "f_sft: held-out SFT loss (lower is better); reward: the demo reward model on the "
        "greedy held-out answers; win rate against the starting model (demo judge); retention: "
        "unitune_mc accuracy; * on the Pareto front of (f_sft, reward).",
        "",
        "| method | schedule | f_sft | reward | win rate | retention | gen tokens | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']}{' *' if r['front'] else ''} | {r['schedule']} | "
            f"{_pm(r['f_sft'], r['f_sft_std'], '.3f')} | "
            f"{_pm(r['heldout_reward'], r['heldout_reward_std'], '.2f')} | "
            f"{_pm(r['win_rate'], r['win_rate_std'], '.2f')} | "
            f"{_pm(r['retention'], r['retention_std'], '.2f')} | "
            f"{r['gen_tokens']:.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def draw_front(rows: list[dict], path: Path) -> Path:
    """f_sft against held-out reward, one point per (method, schedule) with its std over seeds,
    the Pareto front joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = {"pref": "o", "alright": "s", "mix": "^", EQUAL_COST: "D"}
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for r in rows:
        ax.errorbar(
            r["f_sft"], r["heldout_reward"],
            xerr=None if math.isnan(r["f_sft_std"]) else r["f_sft_std"],
            yerr=None if math.isnan(r["heldout_reward_std"]) else r["heldout_reward_std"],
            marker=markers[r["schedule"]], color=colours[r["arm"]], linestyle="none",
            label=f"{r['arm']} / {r['schedule']}",
        )  # fmt: skip
    front = sorted((r for r in rows if r["front"]), key=lambda r: r["f_sft"])
    if len(front) > 1:
        ax.plot([r["f_sft"] for r in front], [r["heldout_reward"] for r in front], "k--", lw=1)
    ax.set_xlabel("f_sft: held-out SFT loss (lower is better)")
    ax.set_ylabel("held-out reward (higher is better)")
    ax.set_title("online study: methods x schedules (mean ± std over seeds)")
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_online_study(
    *,
    model: str = "builtin:smollm2-135m",
    out_dir: Path = Path("runs/online-study"),
    arms: list[str] | None = None,
    schedules: tuple[str, ...] = STUDY_SCHEDULES,
    steps: int | None = None,
    seeds: int = 2,
    precision: str | None = None,
    preset: str = "quick",
    equal_cost: bool = True,
    reward_model_steps: int = REWARD_MODEL_STEPS,
    console: Console | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train the reward model (or reuse it), every run of the study, then the tables, the front
    and the HTML report; returns the aggregated rows."""
    from unitune.core.io import atomic_write
    from unitune.core.usage import cpu_name
    from unitune.jobs import train as jobs_train
    from unitune.study.report import build_report

    console = console or Console()
    chosen = PRESETS[preset]
    steps = steps or chosen.steps
    precision = precision or default_precision()
    arms = arms or list(ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    console.log(f"online study: {len(arms)} methods x {len(schedules)} schedules x {seeds} "
                f"seed(s), {steps} steps, precision {precision}")  # fmt: skip
    rm_cfg = demo_reward_config(model=model, out_dir=out_dir, steps=reward_model_steps)
    rm = demo_reward_model(rm_cfg, console, progress=progress)
    common = dict(model=model, out_dir=out_dir, steps=steps, seeds=seeds, precision=precision,
                  reward_model=rm, evals=chosen.evals, generate_samples=chosen.generate_samples,
                  eval_samples=chosen.eval_samples)  # fmt: skip
    results: list[dict] = []

    def train_all(plan: list[tuple[str, str, int, Any]]) -> None:
        for k, (arm, schedule, seed, cfg) in enumerate(plan, 1):
            console.log(f"online study: run {k}/{len(plan)}: {arm}, {schedule}, seed {seed}")
            summary = jobs_train(cfg, console=console, progress=progress)
            per_generation = cfg.train.batch_size * cfg.steps_per_generation()
            figures = run_figures(Path(cfg.output_dir), summary, rm, per_generation)
            results.append({"arm": arm, "schedule": schedule, "seed": seed, **figures})

    train_all(study_runs(arms=arms, schedules=schedules, **common))
    offline = [a for a in arms if ARMS[a].generations is None]
    if equal_cost and offline and "alright" in schedules and "mix" in schedules:
        ratio = _cost_ratio(results, offline)
        more = max(steps, round(steps * ratio))
        console.log(f"online study: ALRIGHT at mix's cost: {more} steps (mix's step costs "
                    f"{ratio:.2f}x ALRIGHT's)")  # fmt: skip
        plan = study_runs(arms=offline, schedules=(), alright_steps=more, **common)
        train_all(plan)
    rows = aggregate(results)
    meta = {"model": model, "steps": steps, "batch": 4, "seeds": seeds, "precision": precision,
            "cpu": cpu_name()}  # fmt: skip
    text = markdown(rows, meta)
    atomic_write(out_dir / "study.md", text)
    dump = {"meta": meta, "rows": rows, "runs": results}
    atomic_write(out_dir / "study.json", json.dumps(dump, indent=2) + "\n")
    front = draw_front(rows, out_dir / "front.png")
    report = build_report([out_dir / "runs"], out_dir / "report")
    console.print(text, markup=False, highlight=False)
    console.print(f"study: {out_dir / 'study.md'}, front: {front}, report: {report.index}")
    return rows


def _cost_ratio(results: list[dict], offline: list[str]) -> float:
    """Mix's mean step time over ALRIGHT's, over the offline arms' runs."""

    def mean(schedule: str) -> float:
        values = [r["step_s"] for r in results if r["arm"] in offline
                  and r["schedule"] == schedule and not math.isnan(r["step_s"])]  # fmt: skip
        return statistics.mean(values) if values else math.nan

    ratio = mean("mix") / mean("alright")
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0
