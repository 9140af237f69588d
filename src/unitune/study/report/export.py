"""The report's machine-readable files: ``groups.csv`` (one row per group: ``<column>_mean``,
``<column>_std``, ``<column>_n``), ``runs.csv`` (one row per run) and ``report.json``
(everything: runs, groups with their shared config, the tables, the front, the ideal, notes)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from unitune.study.report.collect import Group
from unitune.study.report.stats import MeanStd, Stats
from unitune.study.report.tables import Table

__all__ = ["report_json", "write_csvs", "write_json"]


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _ms(ms: MeanStd | None) -> dict[str, Any] | None:
    return None if ms is None else {"mean": _num(ms.mean), "std": _num(ms.std), "n": ms.n}


def _csv_num(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else repr(float(x))


def write_csvs(groups: list[Group], stats: Stats, out: Path) -> list[Path]:
    """``out/groups.csv`` and ``out/runs.csv``; an empty cell is a value that is not there (a
    std of a single run included)."""
    cols = stats.columns + stats.cost
    on_front = set(stats.pareto)
    gpath = out / "groups.csv"
    with gpath.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["group", "label", "series", "schedule", "lam", "n", "seeds", "pareto_front",
             "f_sft_star", "f_pref_star"]
            + [f"{c}_{part}" for c in cols for part in ("mean", "std", "n")]
        )  # fmt: skip
        for g in groups:
            star = stats.ideal[g.id]
            row = [g.id, g.label, g.series, g.schedule, _csv_num(g.lam), len(g.runs),
                   " ".join("" if s is None else str(s) for s in g.seeds), g.id in on_front,
                   _csv_num(star[0] if star else None),
                   _csv_num(star[1] if star else None)]  # fmt: skip
            for c in cols:
                ms = stats.groups[g.id].get(c)
                row += ["", "", 0] if ms is None else [_csv_num(ms.mean), _csv_num(ms.std), ms.n]
            w.writerow(row)
    rpath = out / "runs.csv"
    with rpath.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["run_dir", "group", "label", "name", "schedule", "lam", "seed", "f_sft_star",
             "f_pref_star", "judge", *cols]
        )  # fmt: skip
        for g in groups:
            for r in g.runs:
                v = stats.value(r)
                judge = (r.gen_eval or {}).get("judge", "")
                w.writerow(
                    [str(r.run_dir), g.id, g.label, r.name, r.schedule, _csv_num(r.lam),
                     "" if r.seed is None else r.seed, _csv_num(r.ideal[0]), _csv_num(r.ideal[1]),
                     judge] + [_csv_num(v.get(c)) for c in cols]
                )  # fmt: skip
    return [gpath, rpath]


def report_json(
    dirs: list[Path],
    groups: list[Group],
    stats: Stats,
    tables: list[Table],
    figures: list[Path],
    notes: list[str],
) -> dict[str, Any]:
    """The whole report as plain JSON data."""
    return {
        "inputs": [str(d) for d in dirs],
        "columns": {"metrics": stats.columns, "cost": stats.cost},
        "groups": [
            {
                "id": g.id,
                "label": g.label,
                "series": g.series,
                "schedule": g.schedule,
                "lam": g.lam,
                "n": len(g.runs),
                "seeds": g.seeds,
                "runs": [str(r.run_dir) for r in g.runs],
                "differs": g.differs,
                "pareto_front": g.id in stats.pareto,
                "ideal": list(stats.ideal[g.id]) if stats.ideal[g.id] else None,
                "stats": {c: _ms(stats.groups[g.id].get(c)) for c in stats.columns + stats.cost},
                "trajectory": {
                    key: {
                        "step": steps,
                        "mean": [_num(p.mean) for p in pts],
                        "std": [_num(p.std) for p in pts],
                        "n": [p.n for p in pts],
                    }
                    for key, (steps, pts) in stats.trajectories[g.id].items()
                },
                "config": g.config,
            }
            for g in groups
        ],
        "runs": [
            {
                "run_dir": str(r.run_dir),
                "group": g.id,
                "name": r.name,
                "schedule": r.schedule,
                "lam": r.lam,
                "seed": r.seed,
                "ideal": list(r.ideal),
                "config_source": r.config_source,
                "values": {k: _num(v) for k, v in stats.value(r).items()},
                "eval": r.gen_eval,
            }
            for g in groups
            for r in g.runs
        ],
        "pareto_front": list(stats.pareto),
        "tradeoff": {s: [g.id for g in members] for s, members in stats.tradeoff.items()},
        "axis_labels": stats.labels,
        "tables": [
            {"name": t.name, "title": t.title, "columns": t.columns, "rows": t.rows} for t in tables
        ],
        "figures": [p.name for p in figures],
        "notes": notes,
    }


def _clean(x: Any) -> Any:
    """NaN and infinities as null: strict JSON."""
    if isinstance(x, float):
        return _num(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(data: dict[str, Any], out: Path) -> Path:
    """``out/report.json`` (strict JSON: a value that is not finite is null)."""
    path = out / "report.json"
    text = json.dumps(_clean(data), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path
