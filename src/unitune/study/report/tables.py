"""The report's tables as rows of text, shared by the console (rich), the HTML page and
``report.json``: the final metrics and the cost per group (mean ± std over seeds, n), the λ
trade-off per schedule, the Pareto front, and the ideal distance."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table as RichTable

from unitune.study.report.collect import DASH, Group
from unitune.study.report.stats import Stats, fmt

__all__ = ["Table", "report_tables", "rich_tables"]

# columns of the λ-trade-off and Pareto tables, where present
KEY_METRICS = ("f_sft", "f_pref", "ideal_distance", "reward_acc", "win_rate")


@dataclass
class Table:
    """A titled table of text cells; the first ``left`` columns are labels, the rest numbers."""

    name: str  # groups | cost | tradeoff | pareto | ideal
    title: str
    columns: list[str]
    rows: list[list[str]]
    left: int = 1
    caption: str = ""
    groups: list[str] = field(default_factory=list)  # the group id of each row


def _cell(stats: Stats, g: Group, col: str) -> str:
    ms = stats.groups[g.id].get(col)
    return DASH if ms is None else ms.text()


def _seeds(g: Group) -> str:
    return " ".join(DASH if s is None else str(s) for s in g.seeds)


def report_tables(groups: list[Group], stats: Stats) -> list[Table]:
    """The tables, in the order the report shows them."""
    by_id = {g.id: g for g in groups}
    tables = [
        Table(
            "groups",
            "Final held-out metrics per group (mean \u00b1 std over seeds)",
            ["group", "n", "seeds", *stats.columns],
            [
                [g.label, str(len(g.runs)), _seeds(g)] + [_cell(stats, g, c) for c in stats.columns]
                for g in groups
            ],  # fmt: skip
            left=1,
            caption="std: sample standard deviation over the group's seeds (\u2013 for one run)",
            groups=[g.id for g in groups],
        )
    ]
    if stats.cost:
        tables.append(
            Table(
                "cost",
                "Cost per group (mean \u00b1 std over seeds; seconds, tokens/s, MB)",
                ["group", "n", *stats.cost],
                [
                    [g.label, str(len(g.runs))] + [_cell(stats, g, c) for c in stats.cost]
                    for g in groups
                ],  # fmt: skip
                groups=[g.id for g in groups],
            )
        )
    key = [c for c in KEY_METRICS if c in stats.columns]
    rows, ids = [], []
    for series, members in stats.tradeoff.items():
        for g in members:
            lam = DASH if g.lam is None else f"{g.lam:g}"
            rows.append([series, lam, str(len(g.runs))] + [_cell(stats, g, c) for c in key])
            ids.append(g.id)
    tables.append(
        Table(
            "tradeoff",
            "\u03bb trade-off per schedule (groups sorted by \u03bb)",
            ["series", "\u03bb", "n", *key],
            rows,
            left=2,
            caption="\u03bb: weight / probability of the preference objective",
            groups=ids,
        )
    )
    tables.append(
        Table(
            "pareto",
            "Pareto front of the groups' mean (f_sft, f_pref), lower is better",
            ["group", "n", *key],
            [
                [by_id[i].label, str(len(by_id[i].runs))] + [_cell(stats, by_id[i], c) for c in key]
                for i in stats.pareto
            ],  # fmt: skip
            caption="a group is on the front when no other group is at least as good in both "
            "f_sft and f_pref and better in one",
            groups=list(stats.pareto),
        )
    )
    ranked = sorted(
        groups,
        key=lambda g: (
            "ideal_distance" not in stats.groups[g.id],
            stats.groups[g.id]["ideal_distance"].mean if "ideal_distance" in stats.groups[g.id]
            else 0.0,
        ),
    )  # fmt: skip
    rows = []
    for rank, g in enumerate(ranked, 1):
        star = stats.ideal[g.id]
        rows.append(
            [
                str(rank),
                g.label,
                str(len(g.runs)),
                fmt(star[0]) if star else "disagree",
                fmt(star[1]) if star else "disagree",
                _cell(stats, g, "ideal_distance"),
            ]
        )
    tables.append(
        Table(
            "ideal",
            "Ideal distance sqrt((f_sft - f_sft*)\u00b2 + (f_pref - f_pref*)\u00b2), nearest first",
            ["rank", "group", "n", "f_sft*", "f_pref*", "ideal_distance"],
            rows,
            left=2,
            caption="f_sft*, f_pref*: the ideal point the group's runs were measured against",
            groups=[g.id for g in ranked],
        )
    )
    return tables


def rich_tables(tables: list[Table]) -> list[RichTable]:
    """The tables for a terminal."""
    out = []
    for t in tables:
        rt = RichTable(title=t.title, caption=t.caption or None, title_justify="left")
        for i, col in enumerate(t.columns):
            rt.add_column(col, justify="left" if i < t.left else "right", overflow="fold")
        for row in t.rows:
            rt.add_row(*row)
        out.append(rt)
    return out
