"""The numbers of a report: each run's values, each group's mean ± std over its seeds, the Pareto
front of the groups, the λ trade-off per schedule, the ideal point and the mean trajectories.

Standard deviations are sample standard deviations (n - 1); a group of one run has none (shown
as "–", never 0). Values that are missing or not finite (a diverged run's NaN) are left out of a
mean, and its ``n`` says how many went in.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from unitune.study.plots import axis_label, pareto_front
from unitune.study.report.collect import DASH, Group, Run

__all__ = [
    "COST",
    "MeanStd",
    "Stats",
    "compute",
    "ideal_points",
    "mean_std",
    "metric_columns",
    "pareto_groups",
    "run_values",
    "tradeoff",
    "trajectory",
]

# summary.json: what a run cost (tokens / peak memory only where the summary has them)
COST = (
    "wall_s",
    "train_s",
    "eval_s",
    "tokens",
    "tokens_per_s",
    "peak_rss_mb",
    "peak_accelerator_mb",
)
# final eval fields that are bookkeeping, not metrics (the run's timings come from COST)
NOT_METRICS = ("step", "elapsed_s", "eval_s", "type")
# the order metrics are listed in; others follow alphabetically
FIRST = ("f_sft", "f_pref", "ideal_distance", "reward_acc", "reward_margin", "deviation")
TRAJECTORY_KEYS = ("f_sft", "f_pref", "ideal_distance")


@dataclass(frozen=True)
class MeanStd:
    """Mean, sample standard deviation (None for one value) and count."""

    mean: float
    std: float | None
    n: int

    def text(self, digits: int | None = None) -> str:
        """``mean ± std``, or the mean alone with "± –" for a single value."""
        std = DASH if self.std is None else fmt(self.std, digits)
        return f"{fmt(self.mean, digits)} \u00b1 {std}"


def fmt(x: float | None, digits: int | None = None) -> str:
    """A number for a table: 4 decimals below 10, 2 below 1000, none above (or ``digits``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    if digits is not None:
        return f"{x:.{digits}f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) >= 10 else f"{x:.4f}"


def mean_std(values: list[float | None]) -> MeanStd | None:
    """Mean ± sample std of the finite values; None when there are none."""
    xs = [float(v) for v in values if _is_num(v) and math.isfinite(float(v))]
    if not xs:
        return None
    return MeanStd(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_values(run: Run) -> dict[str, float]:
    """Every reported value of one run: the final eval's metrics, the generation evaluation
    (``win_rate``, ``win_rate_se``, ``retention:<task>:<metric>``) and the cost (`COST`)."""
    out: dict[str, float] = {}
    final = run.summary.get("final")
    final = final if isinstance(final, dict) else {}
    for k, v in final.items():
        if k not in NOT_METRICS and _is_num(v):
            out[k] = float(v)
    if "ideal_distance" not in out and "f_sft" in out and "f_pref" in out:
        out["ideal_distance"] = math.hypot(
            out["f_sft"] - run.ideal[0], out["f_pref"] - run.ideal[1]
        )
    gen = run.gen_eval or {}
    for k in ("win_rate", "win_rate_se"):
        if _is_num(gen.get(k)):
            out[k] = float(gen[k])  # eval.json over a final eval line's copy
    # retention: `unitune eval`'s (eval.json) over the training run's own (summary.json)
    retention = gen.get("retention") or run.summary.get("retention")
    if isinstance(retention, dict):
        for task, scores in sorted(retention.items()):
            if isinstance(scores, dict):
                for metric, v in sorted(scores.items()):
                    if _is_num(v):
                        out[f"retention:{task}:{metric}"] = float(v)
    for k in COST:
        if _is_num(run.summary.get(k)):
            out[k] = float(run.summary[k])
    return out


def metric_columns(values: list[dict[str, float]]) -> tuple[list[str], list[str]]:
    """(metric columns, cost columns) present in any run, in report order: `FIRST`, the rest of
    the final metrics alphabetically, the steps per objective, ``win_rate``, the retention
    scores; cost in `COST` order."""
    keys = {k for v in values for k in v}
    cost = [k for k in COST if k in keys]
    rest = keys - set(cost)
    gen = [k for k in ("win_rate", "win_rate_se") if k in rest]
    retention = sorted(k for k in rest if k.startswith("retention:"))
    first = [k for k in FIRST if k in rest]
    steps = [k for k in ("steps_sft", "steps_pref") if k in rest]
    others = sorted(rest - set(first) - set(steps) - set(gen) - set(retention))
    return first + others + steps + gen + retention, cost


def pareto_groups(points: dict[str, tuple[float, float]]) -> list[str]:
    """The keys of the non-dominated points (lower is better in both), by the first coordinate
    (`plots.pareto_front`)."""
    keys = list(points)
    front = [keys[i] for i in pareto_front([points[k] for k in keys])]
    return sorted(front, key=lambda k: (points[k][0], -points[k][1]))


def tradeoff(groups: list[Group]) -> dict[str, list[Group]]:
    """The groups of each series (a schedule, with whatever else sets its groups apart besides
    λ), sorted by λ."""
    out: dict[str, list[Group]] = {}
    for g in groups:
        out.setdefault(g.series, []).append(g)
    for members in out.values():
        members.sort(key=lambda g: (g.lam is None, g.lam if g.lam is not None else 0.0, g.label))
    return out


def ideal_points(groups: list[Group]) -> tuple[dict[str, tuple[float, float] | None], list[str]]:
    """Each group's ideal point (f_sft*, f_pref*) from its runs' summaries (None when its runs
    disagree), and notes when runs disagree on it."""
    notes = []
    per_group: dict[str, tuple[float, float] | None] = {}
    for g in groups:
        stars = {r.ideal for r in g.runs}
        if len(stars) > 1:
            per_group[g.id] = None
            what = "; ".join(f"{r.run_dir}: {_pt(r.ideal)}" for r in g.runs)
            notes.append(
                f"{g.label}: its runs disagree on the ideal point (f_sft*, f_pref*): {what}"
            )
        else:
            per_group[g.id] = next(iter(stars))
    distinct: dict[tuple[float, float], list[str]] = {}
    for g in groups:
        for r in g.runs:
            distinct.setdefault(r.ideal, [])
            if g.label not in distinct[r.ideal]:
                distinct[r.ideal].append(g.label)
    if len(distinct) > 1:
        what = "; ".join(f"{_pt(p)} in {', '.join(labels)}" for p, labels in distinct.items())
        notes.append(
            "runs disagree on the ideal point (f_sft*, f_pref*): "
            f"{what}; each ideal distance is measured to its own run's point"
        )
    return per_group, notes


def _pt(p: tuple[float, float]) -> str:
    return f"({p[0]:.4g}, {p[1]:.4g})"


def trajectory(group: Group) -> dict[str, tuple[list[int], list[MeanStd]]]:
    """Mean ± std over the group's runs of each eval line's f_sft, f_pref and ideal distance,
    per step (a step's mean is over the runs that have it)."""
    out: dict[str, tuple[list[int], list[MeanStd]]] = {}
    for key in TRAJECTORY_KEYS:
        by_step: dict[int, list[float]] = {}
        for run in group.runs:
            for e in run.evals:
                v = e.get(key)
                if v is None and key == "ideal_distance":
                    v = math.hypot(e["f_sft"] - run.ideal[0], e["f_pref"] - run.ideal[1])
                if _is_num(v) and _is_num(e.get("step")):
                    by_step.setdefault(int(e["step"]), []).append(float(v))
        steps, points = [], []
        for step in sorted(by_step):
            ms = mean_std(by_step[step])
            if ms is not None:
                steps.append(step)
                points.append(ms)
        if steps:
            out[key] = (steps, points)
    return out


@dataclass
class Stats:
    """Everything a report's tables and figures show."""

    columns: list[str]  # metric columns, report order
    cost: list[str]  # cost columns
    runs: dict[str, dict[str, float]]  # run directory -> its values
    groups: dict[str, dict[str, MeanStd]]  # group id -> column -> mean ± std
    pareto: list[str]  # ids of the groups on the front of their mean (f_sft, f_pref), by f_sft
    tradeoff: dict[str, list[Group]]  # series -> its groups by λ
    ideal: dict[str, tuple[float, float] | None]  # group id -> its runs' f* (None: they disagree)
    labels: dict[str, str]  # axis labels of f_sft, f_pref (what the summaries say they measure)
    trajectories: dict[str, dict[str, tuple[list[int], list[MeanStd]]]] = field(
        default_factory=dict
    )  # group id -> key -> (steps, mean ± std)
    notes: list[str] = field(default_factory=list)

    def value(self, run: Run) -> dict[str, float]:
        return self.runs[str(run.run_dir)]


def _measure_labels(runs: list[Run], notes: list[str]) -> dict[str, str]:
    defaults = {"f_sft": "f_sft: held-out SFT loss", "f_pref": "f_pref: held-out preference loss"}
    out = {}
    for key, default in defaults.items():
        try:
            out[key] = axis_label(runs, key, default)
        except ValueError as err:
            notes.append(str(err))
            out[key] = f"{key} (measured differently by some runs, see the notes)"
    return out


def compute(groups: list[Group]) -> Stats:
    """The statistics of grouped runs."""
    notes: list[str] = []
    runs = [r for g in groups for r in g.runs]
    values = {str(r.run_dir): run_values(r) for r in runs}
    columns, cost = metric_columns(list(values.values()))
    per_group = {}
    for g in groups:
        stats = {}
        for c in columns + cost:
            ms = mean_std([values[str(r.run_dir)].get(c) for r in g.runs])
            if ms is not None:
                stats[c] = ms
        per_group[g.id] = stats
        seeds = [s for s in g.seeds if s is not None]
        if len(set(seeds)) < len(seeds):
            notes.append(f"{g.label}: a seed appears more than once ({sorted(seeds)})")
    points = {
        g.id: (per_group[g.id]["f_sft"].mean, per_group[g.id]["f_pref"].mean)
        for g in groups
        if "f_sft" in per_group[g.id] and "f_pref" in per_group[g.id]
    }
    ideal, ideal_notes = ideal_points(groups)
    notes += ideal_notes
    no_evals = [str(r.run_dir) for r in runs if not r.evals]
    if no_evals:
        notes.append("no eval lines with f_sft and f_pref (no trajectory): " + ", ".join(no_evals))
    stand_ins = [str(r.run_dir) for r in runs if r.config_source == "summary.json"]
    if stand_ins:
        notes.append(
            "no config.yaml, grouped by schedule, λ and objectives from summary.json: "
            + ", ".join(stand_ins)
        )
    return Stats(
        columns=columns,
        cost=cost,
        runs=values,
        groups=per_group,
        pareto=pareto_groups(points),
        tradeoff=tradeoff(groups),
        ideal=ideal,
        labels=_measure_labels(runs, notes),
        trajectories={g.id: trajectory(g) for g in groups},
        notes=notes,
    )
