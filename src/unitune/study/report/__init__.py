"""`unitune report DIR... -o OUT`: tables, figures and a static HTML page over run directories.

collect.py finds and reads the runs and groups those that differ only in the seed; stats.py
computes mean ± std over seeds, the Pareto front, the λ trade-off, the ideal point and the mean
trajectories; tables.py lays them out as text tables (console, HTML, JSON); export.py writes
``groups.csv``, ``runs.csv`` and ``report.json``; figures.py draws the PNG / SVG figures;
html.py writes ``index.html``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unitune.study.report.collect import Group, ReportError, Run, find_runs, group_runs, read_run
from unitune.study.report.export import report_json, write_csvs, write_json
from unitune.study.report.figures import draw_figures
from unitune.study.report.html import write_html
from unitune.study.report.stats import Stats, compute
from unitune.study.report.tables import Table, report_tables, rich_tables

__all__ = ["ReportError", "ReportResult", "build_report", "rich_tables"]

FIGURE_STEMS = ("front", "lambda", "trajectories")


@dataclass
class ReportResult:
    """What `build_report` found and wrote."""

    out: Path
    index: Path  # out/index.html
    files: list[Path]  # every file written, index.html last
    runs: list[Run]
    groups: list[Group]
    stats: Stats
    tables: list[Table]
    notes: list[str] = field(default_factory=list)


def build_report(dirs: list[Path], out: Path) -> ReportResult:
    """Find every run under ``dirs`` (run or sweep directories), group the runs by seed, and
    write the tables (CSV, JSON), the figures (PNG, SVG) and ``index.html`` into ``out``.

    Raises ReportError, one line naming the directory or file, for an input that is not there,
    no summary.json under the inputs, or a file that cannot be read or parsed.
    """
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    found, notes = find_runs(dirs)
    runs = [read_run(d) for d in found]
    groups = group_runs(runs)
    stats = compute(groups)
    notes = notes + stats.notes
    tables = report_tables(groups, stats)
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = draw_figures(groups, stats, out)
        for stem in FIGURE_STEMS:  # a figure an earlier report drew and this one does not
            for old in (out / f"{stem}.png", out / f"{stem}.svg"):
                if old not in figures and old.is_file():
                    old.unlink()
        files = figures + write_csvs(groups, stats, out)
        files.append(write_json(report_json(dirs, groups, stats, tables, figures, notes), out))
        index = write_html(out, dirs, groups, stats, tables, figures, notes)
    except OSError as err:
        where = err.filename or out
        raise ReportError(f"{where}: cannot write the report: {err.strerror or err}") from None
    return ReportResult(out, index, [*files, index], runs, groups, stats, tables, notes)
