"""``index.html``: the report as one static page, next to its figures and files.

No server, no network, no script, no external style sheet or font: the style is inline, images
are referenced by relative paths (the PNGs beside it, each linked to its SVG), and every text
is HTML-escaped. Each run's config is in a collapsible ``<details>``.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from unitune.study.report.collect import Group
from unitune.study.report.stats import Stats, fmt
from unitune.study.report.tables import Table

__all__ = ["write_html"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem auto;
       max-width: 88rem; padding: 0 1rem; color: #111; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #bbb; padding: 0.2rem 0.5rem; white-space: nowrap; }
th { background: #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: bottom; text-align: left; font-size: 0.8rem; color: #444; padding: 0.2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #333; }
details { margin: 0.3rem 0; } summary { cursor: pointer; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.5rem; overflow-x: auto;
      font-size: 0.8rem; }
.notes li { color: #7a4b00; }
code { font-size: 0.85rem; }
"""

FIGURES = {
    "front": "Groups in the (f_sft, f_pref) plane: mean over seeds with std error bars, the "
    "\u03bb trade-off of each schedule as a line, the Pareto front and the ideal point.",
    "lambda": "The \u03bb trade-off per schedule: f_sft, f_pref and the ideal distance against "
    "\u03bb (mean \u00b1 std over seeds).",
    "trajectories": "Held-out metrics over training: each group's mean over seeds, with a "
    "\u00b1 std band.",
}


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _table(t: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i >= t.left else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return (
        f'<h2 id="{_e(t.name)}">{_e(t.title)}</h2>\n<div class="scroll"><table id="table-'
        f'{_e(t.name)}">{caption}<thead><tr>{head}</tr></thead><tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>"
    )


def _figures(figures: list[Path]) -> str:
    names = [p.name for p in figures]
    parts = []
    for stem, caption in FIGURES.items():
        png, svg = f"{stem}.png", f"{stem}.svg"
        if png not in names:
            continue
        link = f' (<a href="{_e(svg)}">SVG</a>)' if svg in names else ""
        parts.append(
            f'<figure id="figure-{_e(stem)}"><a href="{_e(png)}"><img src="{_e(png)}" '
            f'alt="{_e(caption)}"></a><figcaption>{_e(caption)}{link}</figcaption></figure>'
        )
    return "\n".join(parts)


def _runs(groups: list[Group], stats: Stats) -> str:
    key = [c for c in ("f_sft", "f_pref", "ideal_distance", "win_rate", "wall_s") if c in
           stats.columns + stats.cost]  # fmt: skip
    head = "".join(f"<th>{_e(c)}</th>" for c in ["run", "group", "seed", *key])
    rows, details = [], []
    for g in groups:
        for r in g.runs:
            v = stats.value(r)
            cells = [f"<td>{_e(r.run_dir)}</td>", f"<td>{_e(g.label)}</td>",
                     f'<td class="num">{_e("" if r.seed is None else r.seed)}</td>']  # fmt: skip
            cells += [f'<td class="num">{_e(fmt(v.get(c)))}</td>' for c in key]
            rows.append(f"<tr>{''.join(cells)}</tr>")
            if r.config_source == "summary.json":
                body = "<p>No config.yaml: grouped by the schedule, \u03bb and objectives of its "
                body += "summary.json.</p>"
            else:
                note = ""
                if r.config_source != "config.yaml":
                    note = (
                        f"<p>From {_e(r.config_source)} (a parallel run keeps its config in its "
                        "branches; the schedule is parallel).</p>"
                    )
                body = f"{note}<pre>{_e(r.config_text)}</pre>"
            seed = "" if r.seed is None else f", seed {r.seed}"
            details.append(
                f"<details><summary>{_e(r.run_dir)} \u2014 {_e(g.label)}{_e(seed)} "
                f"({_e(r.config_source)})</summary>{body}</details>"
            )
    return (
        '<h2 id="runs">Runs</h2>\n<div class="scroll"><table id="table-runs"><thead><tr>'
        + head
        + "</tr></thead><tbody>\n"
        + "\n".join(rows)
        + '\n</tbody></table></div>\n<h2 id="configs">Configs</h2>\n'
        + "\n".join(details)
    )


def write_html(
    out: Path,
    dirs: list[Path],
    groups: list[Group],
    stats: Stats,
    tables: list[Table],
    figures: list[Path],
    notes: list[str],
) -> Path:
    """Write ``out/index.html``; returns its path."""
    n_runs = sum(len(g.runs) for g in groups)
    inputs = ", ".join(f"<code>{_e(d)}</code>" for d in dirs)
    notes_html = (
        '<h2 id="notes">Notes</h2><ul class="notes">'
        + "".join(f"<li>{_e(n)}</li>" for n in notes)
        + "</ul>"
        if notes
        else ""
    )
    files = " \u00b7 ".join(
        f'<a href="{_e(f)}">{_e(f)}</a>' for f in ("groups.csv", "runs.csv", "report.json")
    )
    tables_html = "\n".join(_table(t) for t in tables)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>unitune report</title>
<style>{CSS}</style>
</head>
<body>
<h1>unitune report</h1>
<p>{n_runs} run(s) in {len(groups)} group(s) from {inputs}. Runs whose configs differ only in
<code>train.seed</code> (and <code>output_dir</code>, <code>name</code>, <code>cache_dir</code>)
form one group; values are the mean &plusmn; sample std over its seeds (&ndash; for one run).
Lower is better for f_sft, f_pref and the ideal distance. Files: {files}.</p>
{notes_html}
<h2 id="figures">Figures</h2>
{_figures(figures)}
{tables_html}
{_runs(groups, stats)}
</body>
</html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
