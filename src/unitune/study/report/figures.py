"""The report's figures, PNG and SVG, drawn with plots.py's styles and helpers (Agg canvas, no
pyplot).

- ``front``: each group's mean (f_sft, f_pref) with error bars (std over seeds), the groups of
  one series joined in λ order and labelled, the Pareto front of the groups, the ideal point.
- ``lambda``: f_sft, f_pref and the ideal distance against λ, one labelled line per series
  (drawn when some series has two λ or more).
- ``trajectories``: f_sft, f_pref and the ideal distance over training, the mean over seeds of
  each group's eval lines with a ±std band.

Every series or group has its own marker *and* line style (they read in grayscale), and text next
to its points or at its line's end, besides the legend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from unitune.study.plots import MAX_MARKERS, draw_front, draw_ideals, new_figure, save_figure, style
from unitune.study.report.collect import Group
from unitune.study.report.stats import Stats

__all__ = ["draw_figures", "front_figure", "lambda_figure", "trajectory_figure"]

PANELS = (("f_sft", 0), ("f_pref", 1), ("ideal_distance", None))  # key, index in f*


def _common_ideal(groups: list[Group], stats: Stats) -> tuple[float, float] | None:
    stars = {stats.ideal[g.id] for g in groups}
    return next(iter(stars)) if len(stars) == 1 and None not in stars else None


def _label_at(ax: Any, text: str, x: float, y: float, color: str, dy: int = 6) -> None:
    ax.annotate(
        text, (x, y), xytext=(7, dy), textcoords="offset points", fontsize=7.5, color=color,
        zorder=7,
    )  # fmt: skip


def _ms(stats: Stats, g: Group, key: str) -> tuple[float, float] | None:
    ms = stats.groups[g.id].get(key)
    return None if ms is None else (ms.mean, ms.std or 0.0)


def front_figure(groups: list[Group], stats: Stats, out_stem: Path) -> list[Path]:
    """Groups' mean points in the (f_sft, f_pref) plane; SVG ids ``<group id>-mean``,
    ``series<i>-line``, ``pareto-front``, ``ideal0``."""
    fig = new_figure(8.0, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    points = []
    for i, (series, members) in enumerate(stats.tradeoff.items()):
        st = style(i)
        drawn = [
            (g, _ms(stats, g, "f_sft"), _ms(stats, g, "f_pref"))
            for g in members
            if "f_sft" in stats.groups[g.id] and "f_pref" in stats.groups[g.id]
        ]
        if not drawn:
            continue
        xs = [x[0] for _, x, _ in drawn]
        ys = [y[0] for _, _, y in drawn]
        if len(drawn) >= 2:  # the λ trade-off of this series
            (line,) = ax.plot(xs, ys, color=st["color"], linestyle=st["linestyle"], linewidth=1.4,
                              zorder=2)  # fmt: skip
            line.set_gid(f"series{i}-line")
            _label_at(ax, series, xs[-1], ys[-1], st["color"], dy=-12)
        for g, (x, sx), (y, sy) in drawn:
            eb = ax.errorbar(
                x, y, xerr=sx or None, yerr=sy or None, fmt=st["marker"], color=st["color"],
                markersize=8, markerfacecolor=st["color"], markeredgecolor="black",
                markeredgewidth=0.9, ecolor=st["color"], elinewidth=1.0, capsize=3, zorder=4,
            )  # fmt: skip
            eb.lines[0].set_gid(f"{g.id}-mean")
            n = f" (n={len(g.runs)})"
            text = f"\u03bb={g.lam:g}{n}" if len(drawn) >= 2 and g.lam is not None else g.label + n
            _label_at(ax, text, x, y, "black")
            points.append((x, y))
        ax.plot([], [], color=st["color"], linestyle=st["linestyle"] if len(drawn) >= 2 else "none",
                marker=st["marker"], markerfacecolor=st["color"], markeredgecolor="black",
                label=series)  # fmt: skip
    draw_front(ax, points, "Pareto front (group means)")
    draw_ideals(ax, sorted({r.ideal for g in groups for r in g.runs}))
    ax.plot([], [], linestyle="-", color="0.3", marker="|", markersize=8,
            label="error bars: std over seeds")  # fmt: skip
    ax.set_xlabel(stats.labels["f_sft"])
    ax.set_ylabel(stats.labels["f_pref"])
    ax.set_title("Groups (mean over seeds) in the (f_sft, f_pref) plane, lower is better",
                 fontsize=11)  # fmt: skip
    ax.grid(True, color="0.88", linewidth=0.6)
    ax.margins(0.12)
    ax.legend(loc="best", fontsize=8, framealpha=0.9, handlelength=3.2)
    return save_figure(fig, out_stem)


def lambda_figure(groups: list[Group], stats: Stats, out_stem: Path) -> list[Path]:
    """f_sft, f_pref and the ideal distance against λ, a line per series with error bars; SVG
    ids ``series<i>-<key>``; the ideal (when the groups agree on it) as a labelled dotted line."""
    fig = new_figure(12.0, 4.4)
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    ideal = _common_ideal(groups, stats)
    for i, (series, members) in enumerate(stats.tradeoff.items()):
        st = style(i)
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            pts = [(g.lam, _ms(stats, g, key)) for g in members if g.lam is not None]
            pts = [(lam, ms) for lam, ms in pts if ms is not None]
            if not pts:
                continue
            eb = ax.errorbar(
                [p[0] for p in pts], [p[1][0] for p in pts],
                yerr=[p[1][1] for p in pts] if any(p[1][1] for p in pts) else None,
                color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=6,
                markerfacecolor=st["color"], markeredgecolor="black", markeredgewidth=0.8,
                linewidth=1.4, capsize=3, label=series if key == "f_sft" else None,
            )  # fmt: skip
            eb.lines[0].set_gid(f"series{i}-{key}")
            _label_at(ax, series, pts[-1][0], pts[-1][1][0], st["color"])
    for ax, (key, k) in zip(axes, PANELS, strict=True):
        if ideal is not None and k is not None:
            ax.axhline(ideal[k], color="0.2", linestyle=":", linewidth=1.0)
            ax.annotate(
                f"ideal {key}* = {ideal[k]:.4g}", (0.02, ideal[k]),
                xycoords=("axes fraction", "data"), xytext=(0, 4), textcoords="offset points",
                fontsize=8, fontweight="bold",
            )  # fmt: skip
        ax.set_xlabel("\u03bb (weight of the preference objective)")
        ax.set_ylabel(stats.labels.get(key, key) if key != "ideal_distance" else "ideal distance")
        ax.grid(True, color="0.88", linewidth=0.6)
        ax.margins(0.12)
    axes[0].legend(loc="best", fontsize=7.5, framealpha=0.9, handlelength=3.2)
    fig.suptitle("\u03bb trade-off per schedule (mean \u00b1 std over seeds)", fontsize=11)
    return save_figure(fig, out_stem)


def trajectory_figure(groups: list[Group], stats: Stats, out_stem: Path) -> list[Path]:
    """f_sft, f_pref and the ideal distance over training steps, the mean over each group's
    seeds with a ±std band; SVG ids ``<group id>-<key>``."""
    fig = new_figure(12.0, 4.4)
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    ideal = _common_ideal(groups, stats)
    for i, g in enumerate(groups):
        st = style(i)
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            if key not in stats.trajectories[g.id]:
                continue
            steps, pts = stats.trajectories[g.id][key]
            mean = [p.mean for p in pts]
            if any(p.std for p in pts):
                lo = [p.mean - (p.std or 0.0) for p in pts]
                hi = [p.mean + (p.std or 0.0) for p in pts]
                ax.fill_between(steps, lo, hi, color=st["color"], alpha=0.15, linewidth=0)
            (line,) = ax.plot(
                steps, mean, color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=4.5, markerfacecolor="white", markeredgewidth=1.0, linewidth=1.5,
                markevery=max(1, math.ceil(len(steps) / MAX_MARKERS)),
                label=f"{g.label} (n={len(g.runs)})" if key == "f_sft" else None,
            )  # fmt: skip
            line.set_gid(f"{g.id}-{key}")
            _label_at(ax, g.label, steps[-1], mean[-1], st["color"], dy=-3)
    for ax, (key, k) in zip(axes, PANELS, strict=True):
        if ideal is not None and k is not None:
            ax.axhline(ideal[k], color="0.2", linestyle=":", linewidth=1.0)
            ax.annotate(
                f"ideal {key}*", (0.02, ideal[k]), xycoords=("axes fraction", "data"),
                xytext=(0, 4), textcoords="offset points", fontsize=8, fontweight="bold",
            )  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(stats.labels.get(key, key) if key != "ideal_distance" else "ideal distance")
        ax.grid(True, color="0.88", linewidth=0.6)
        ax.margins(x=0.04, y=0.08)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.4 * (hi - lo))  # room for the labels at the lines' ends
    axes[0].legend(loc="best", fontsize=7, framealpha=0.9, handlelength=3.2)
    fig.suptitle("Held-out metrics over training (mean over seeds, band: \u00b1 std)", fontsize=11)
    return save_figure(fig, out_stem)


def draw_figures(groups: list[Group], stats: Stats, out: Path) -> list[Path]:
    """Every figure that has something to show, into ``out``; returns the PNG and SVG paths."""
    files: list[Path] = []
    if any("f_sft" in s and "f_pref" in s for s in stats.groups.values()):
        files += front_figure(groups, stats, out / "front")
    if any(len({g.lam for g in m if g.lam is not None}) >= 2 for m in stats.tradeoff.values()):
        files += lambda_figure(groups, stats, out / "lambda")
    if any(stats.trajectories[g.id] for g in groups):
        files += trajectory_figure(groups, stats, out / "trajectories")
    return files
