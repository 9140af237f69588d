"""Trajectories of runs in the (f_sft, f_pref) plane.

x is the held-out SFT loss, y the held-out preference loss, both read from the ``eval`` lines of
each run directory's ``metrics.jsonl``; ``summary.json`` gives the run's label and the ideal point
(see docs/ARCHITECTURE.md, "Run directory"). Lower is better on both axes.

Runs stay distinguishable in grayscale: every run gets its own line style *and* marker shape, not
only its own colour. Figures are drawn on an Agg canvas without pyplot, so no display is needed and
no global backend state is touched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "RunTrajectory",
    "axis_label",
    "draw_front",
    "draw_ideals",
    "is_parallel_run",
    "load_run",
    "new_figure",
    "pareto_front",
    "plot_runs",
    "read_eval_lines",
    "read_summary",
    "save_figure",
    "style",
]

# axis labels: what the runs' summaries say f_sft and f_pref measure (`metrics.measures`), or these
X_LABEL = "f_sft: held-out SFT loss"
Y_LABEL = "f_pref: held-out preference loss"
DEFAULT_TITLE = "SFT vs preference: trajectories on held-out data"

# Okabe-Ito colours (colour-blind safe); shape and dash carry the identity in grayscale.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINESTYLES: tuple[Any, ...] = (
    "-",
    "--",
    "-.",
    ":",
    (0, (6, 1.5, 1, 1.5, 1, 1.5)),
    (0, (1, 1)),
    (0, (9, 3)),
    (0, (3, 1, 3, 1, 1, 1)),
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">")
MAX_MARKERS = 25  # markers along one trajectory; more eval points are thinned out


@dataclass
class RunTrajectory:
    """The eval trajectory of one run directory."""

    run_dir: Path
    label: str
    f_sft: list[float]
    f_pref: list[float]
    steps: list[int]
    ideal: tuple[float, float]
    summary: dict[str, Any] = field(default_factory=dict)
    stage_switch: int | None = None  # sequential runs: last eval index of the SFT stage
    branches: dict[str, RunTrajectory] = field(default_factory=dict)  # parallel: sft/, pref/


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points, lower being better in both coordinates.

    A point is dominated when another point is no worse in both coordinates and strictly better in
    one. Identical points do not dominate each other, so all copies of a front point are kept.
    Points with a NaN coordinate are never on the front and dominate nothing.
    """
    valid = [not (math.isnan(x) or math.isnan(y)) for x, y in points]
    front = []
    for i, (x, y) in enumerate(points):
        if not valid[i]:
            continue
        dominated = any(
            valid[j] and qx <= x and qy <= y and (qx < x or qy < y)
            for j, (qx, qy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def read_eval_lines(run_dir: Path, *, required: bool = True) -> list[dict[str, Any]]:
    """The ``eval`` lines of ``run_dir/metrics.jsonl`` that carry both f_sft and f_pref.

    A bad JSON line is an error naming the file and the line. A missing file, or one without such
    lines, is an error naming the run directory when ``required``, else gives ``[]``.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if not required:
            return []
        raise FileNotFoundError(f"run directory {run_dir}: no metrics.jsonl at {path}")
    evals = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"run directory {run_dir}: {path}:{lineno}: bad JSON: {err}"
                raise ValueError(msg) from err
            if not isinstance(record, dict) or record.get("type") != "eval":
                continue
            if record.get("f_sft") is None or record.get("f_pref") is None:
                continue  # an eval without both losses (e.g. a single-objective run) is not a point
            evals.append(record)
    if not evals and required:
        raise ValueError(
            f"run directory {run_dir}: {path} has no eval lines with both f_sft and f_pref"
        )
    return evals


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``run_dir/summary.json`` as a dict (``{}`` when absent: a run still in progress); bad JSON
    or a non-object is an error naming the file."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}  # a run still in progress: plot what metrics.jsonl has
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"run directory {run_dir}: {path}: bad JSON: {err}") from err
    if not isinstance(summary, dict):
        raise ValueError(f"run directory {run_dir}: {path}: expected a JSON object")
    return summary


def is_parallel_run(summary: dict[str, Any]) -> bool:
    """Whether a finished run's summary is a parallel (PAFT) job's: its `job`, or, in a run
    directory written before `parallel` was a job, its `schedule`."""
    return summary.get("job") == "parallel" or summary.get("schedule") == "parallel"


def _label(run_dir: Path, summary: dict[str, Any]) -> str:
    name = str(summary.get("name") or run_dir.name)
    details = []
    if summary.get("schedule") and str(summary["schedule"]) != name:
        details.append(str(summary["schedule"]))
    if summary.get("lam") is not None:
        details.append(f"\u03bb={summary['lam']:g}")
    return f"{name} ({', '.join(details)})" if details else name


def _stage_switch(evals: list[dict[str, Any]]) -> int | None:
    """Index of the last eval before a sequential run's preference stage, or None.

    That is the last point with ``steps_pref == 0`` when a later point has ``steps_pref > 0`` and
    an earlier SFT stage exists (``steps_sft > 0`` there).
    """
    pref = [e.get("steps_pref") for e in evals]
    sft = [e.get("steps_sft") for e in evals]
    if any(v is None for v in pref) or any(v is None for v in sft):
        return None
    for i in range(len(evals) - 1):
        if pref[i] == 0 and pref[i + 1] > 0:
            return i if sft[i] > 0 and all(sft[j] == sft[i] for j in range(i, len(evals))) else None
    return None


def load_run(run_dir: Path) -> RunTrajectory:
    """Read one run directory; errors name the directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    evals = read_eval_lines(run_dir)
    summary = read_summary(run_dir)
    final = summary.get("final")
    if (
        isinstance(final, dict)
        and final.get("f_sft") is not None
        and final.get("f_pref") is not None
        and int(final.get("step", -1)) > int(evals[-1].get("step", -1))
    ):
        evals.append(final)  # a final eval that was not logged as a line
    star_sft, star_pref = summary.get("f_sft_star"), summary.get("f_pref_star")
    return RunTrajectory(
        run_dir=run_dir,
        label=_label(run_dir, summary),
        f_sft=[float(e["f_sft"]) for e in evals],
        f_pref=[float(e["f_pref"]) for e in evals],
        steps=[int(e.get("step", i)) for i, e in enumerate(evals)],
        ideal=(
            float(star_sft) if star_sft is not None else 0.0,
            float(star_pref) if star_pref is not None else 0.0,
        ),
        summary=summary,
        stage_switch=_stage_switch(evals),
        branches={
            kind: load_run(run_dir / kind)
            for kind in ("sft", "pref")
            if is_parallel_run(summary) and (run_dir / kind).is_dir()
        },
    )


def style(i: int) -> dict[str, Any]:
    """The ``i``-th series' colour, line style and marker (each cycles on its own)."""
    return {
        "color": COLORS[i % len(COLORS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
    }


def _draw(fig: Figure, runs: list[RunTrajectory], title: str | None) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for i, run in enumerate(runs):
        st = style(i)
        n = len(run.f_sft)
        every = max(1, math.ceil(n / MAX_MARKERS))
        (line,) = ax.plot(
            run.f_sft,
            run.f_pref,
            color=st["color"],
            linestyle=st["linestyle"],
            linewidth=1.6,
            marker=st["marker"],
            markersize=4.5,
            markerfacecolor="white",
            markeredgewidth=1.0,
            markevery=every,
            label=run.label,
            zorder=3,
        )
        line.set_gid(f"run{i}-line")
        (start,) = ax.plot(
            run.f_sft[0],
            run.f_pref[0],
            linestyle="none",
            marker="o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor="0.35",
            markeredgewidth=1.2,
            zorder=2,
        )
        start.set_gid(f"run{i}-start")
        (end,) = ax.plot(
            run.f_sft[-1],
            run.f_pref[-1],
            linestyle="none",
            marker=st["marker"],
            markersize=10,
            markerfacecolor=st["color"],
            markeredgecolor="black",
            markeredgewidth=1.0,
            zorder=5,
        )
        end.set_gid(f"run{i}-end")
        for kind, br in run.branches.items():  # parallel: each branch's path, then the merge
            (bl,) = ax.plot(
                br.f_sft + [run.f_sft[-1]], br.f_pref + [run.f_pref[-1]], color=st["color"],
                linestyle=":", linewidth=1.0, alpha=0.7, zorder=2,
            )  # fmt: skip
            bl.set_gid(f"run{i}-branch-{kind}")
            ax.annotate(
                f"{kind} branch", (br.f_sft[-1], br.f_pref[-1]), xytext=(5, 5),
                textcoords="offset points", fontsize=7, color=st["color"],
            )  # fmt: skip
        if run.stage_switch is not None:
            k = run.stage_switch
            ax.annotate(
                "SFT \u2192 pref", (run.f_sft[k], run.f_pref[k]), xytext=(6, -12),
                textcoords="offset points", fontsize=8, color=st["color"], gid=f"run{i}-switch",
            )  # fmt: skip

    # Legend proxies for the shared encodings.
    ax.plot([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
            markeredgecolor="0.35", label="start")  # fmt: skip
    ax.plot([], [], linestyle="none", marker="o", markersize=9, markerfacecolor="0.5",
            markeredgecolor="black", label="end (filled)")  # fmt: skip

    draw_front(ax, [(r.f_sft[-1], r.f_pref[-1]) for r in runs], "Pareto front (end points)")
    draw_ideals(ax, [r.ideal for r in runs])

    ax.set_xlabel(axis_label(runs, "f_sft", X_LABEL))
    ax.set_ylabel(axis_label(runs, "f_pref", Y_LABEL))
    ax.set_title(title if title is not None else DEFAULT_TITLE, fontsize=11)
    ax.grid(True, color="0.88", linewidth=0.6)
    ax.margins(0.08)
    ax.legend(loc="best", fontsize=8, framealpha=0.9, handlelength=3.2)


def draw_front(ax: Any, points: list[tuple[float, float]], label: str) -> None:
    """The Pareto front of ``points`` as a dashed staircase (SVG id ``pareto-front``); nothing
    for fewer than two points."""
    if len(points) < 2:
        return
    front = sorted((points[k] for k in pareto_front(points)), key=lambda p: (p[0], -p[1]))
    (pf,) = ax.step(
        [p[0] for p in front], [p[1] for p in front], where="post", color="0.3", linewidth=0.8,
        linestyle=(0, (2, 2)), zorder=1, label=label,
    )  # fmt: skip
    pf.set_gid("pareto-front")


def draw_ideals(ax: Any, ideals: list[tuple[float, float]]) -> None:
    """Each distinct ideal point ``(f_sft*, f_pref*)`` as a star labelled "ideal" (SVG ids
    ``ideal0``, ``ideal1``, ...); several ideals (runs that disagree on it) are labelled with
    their coordinates."""
    distinct = sorted(set(ideals))
    for k, (ix, iy) in enumerate(distinct):
        (star,) = ax.plot(
            ix, iy, linestyle="none", marker="*", markersize=16, markerfacecolor="gold",
            markeredgecolor="black", markeredgewidth=0.9, zorder=6,
            label="ideal (f_sft*, f_pref*)" if k == 0 else None,
        )  # fmt: skip
        star.set_gid(f"ideal{k}")
        text = "ideal" if len(distinct) == 1 else f"ideal ({ix:.3g}, {iy:.3g})"
        ax.annotate(
            text, (ix, iy), xytext=(8, 6), textcoords="offset points", fontsize=9,
            fontweight="bold",
        )  # fmt: skip


def new_figure(width: float = 7.5, height: float = 5.5) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_stem: Path) -> list[Path]:
    """Write ``out_stem.png`` (150 dpi) and ``out_stem.svg`` (text kept as text, fixed ids, no
    date: the same input gives the same bytes); returns both paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")
    with matplotlib.rc_context({"svg.hashsalt": "unitune", "svg.fonttype": "none"}):
        fig.savefig(png, dpi=150, metadata={"Software": None})
        fig.savefig(svg, metadata={"Date": None})
    return [png, svg]


def axis_label(runs: list[Any], key: str, default: str) -> str:
    """`key: what it measures`, from the runs' summaries; runs that measure `key` differently
    (another `eval.beta`, pairs against unpaired data) are not comparable in one plot.

    ``runs``: anything with ``.summary`` (a summary.json dict) and ``.run_dir``, such as
    `RunTrajectory`."""
    found = {r.summary["measures"][key]: r for r in runs if key in r.summary.get("measures", {})}
    if len(found) > 1:
        lines = "; ".join(f"{r.run_dir}: {m}" for m, r in found.items())
        raise ValueError(f"runs measure {key} differently, one plot cannot compare them: {lines}")
    return f"{key}: {next(iter(found))}" if found else default


def plot_runs(run_dirs: list[Path], out_stem: Path, *, title: str | None = None) -> list[Path]:
    """Plot each run's eval trajectory in the (f_sft, f_pref) plane.

    Writes ``out_stem.with_suffix(".png")`` (150 dpi) and ``.svg``; returns both paths. In the SVG
    each run's trajectory is the group ``run{i}-line`` (plus ``run{i}-start`` / ``run{i}-end``).
    Raises FileNotFoundError / ValueError naming the run directory when its ``metrics.jsonl`` is
    missing, malformed or has no eval points.
    """
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    runs = [load_run(Path(d)) for d in run_dirs]
    fig = new_figure()
    _draw(fig, runs, title)
    return save_figure(fig, out_stem)
