"""The demo's final tables read at 80 columns and in a log file: no cell cut short."""

from io import StringIO

from rich.console import Console


def _summary(name: str) -> dict:
    """A summary.json as the demo's runs write it, with the widest figures a run can show."""
    final = {"f_sft": 12.3456, "f_pref": 0.6931, "reward_acc": 0.5, "ideal_distance": 12.3456,
             "win_rate": 0.75}  # fmt: skip
    s = {"name": name, "schedule": name, "lam": 0.5, "final": final,
         "steps": {"sft": 1000, "pref": 1000}, "wall_s": 12345.6, "eval_s": 1234.5,
         "retention": {"unitune_mc": {"acc": 0.55}}}  # fmt: skip
    if name == "parallel":
        s["branches"] = {"sft": final, "pref": final}
        s["sparsity"] = {"sft": {"sparsity": 0.456}, "pref": {"sparsity": 1.0}}
        s["base"] = final
    return s


def test_the_demo_tables_fit_80_columns_uncut():
    from unitune.study.demo import SCHEDULES, comparison_tables

    summaries = [_summary(name) for name in SCHEDULES]
    buf = StringIO()  # a log file: not a terminal, rich's default width of 80
    console = Console(width=80, file=buf)
    tables = comparison_tables(summaries)
    for table in tables:
        console.print(table)
    text = buf.getvalue()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for figure in ("12.3456", "0.6931", "0.50", "1000/1000", "0/1000", "0.75", "0.55", "12346",
                   "1234", "100% sparse", "46% sparse"):  # fmt: skip
        assert figure in text, figure
    assert all(name in text for name in SCHEDULES)
    assert len(tables) == 2 and all(t.row_count == len(SCHEDULES) + 3 for t in tables)
