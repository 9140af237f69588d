"""plots.py: the (f_sft, f_pref) trajectory figure and the Pareto front."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from unitune.study.plots import load_run, pareto_front, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(step: int, f_sft: float, f_pref: float, steps_sft: int, steps_pref: int) -> dict:
    return {
        "type": "eval",
        "step": step,
        "f_sft": f_sft,
        "f_pref": f_pref,
        "reward_acc": 0.5 + 0.4 * (0.69 - f_pref),
        "reward_margin": 2.0 * (0.69 - f_pref),
        "deviation": 0.01 * step,
        "ideal_distance": math.hypot(f_sft, f_pref),
        "steps_sft": steps_sft,
        "steps_pref": steps_pref,
        "elapsed_s": 1.5 * step,
    }


def _make_run(
    root: Path,
    dirname: str,
    schedule: str,
    lam: float,
    points: list[tuple[float, float]],
    *,
    star: tuple[float | None, float | None] = (None, None),
) -> Path:
    run = root / dirname
    run.mkdir()
    lines = []
    n_sft = n_pref = 0
    for k, (f_sft, f_pref) in enumerate(points):
        step = 10 * k
        lines.append({"type": "train", "step": step, "objective": "sft", "loss": f_sft + 0.1,
                      "lr": 5e-5, "tokens_per_s": 900.0})  # fmt: skip
        if k:
            if schedule != "sequential":
                n_sft, n_pref = n_sft + 5, n_pref + 5
            elif k <= (len(points) - 1) // 2:
                n_sft += 10
            else:
                n_pref += 10
        lines.append(_eval(step, f_sft, f_pref, n_sft, n_pref))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    final = lines[-1]
    summary = {
        "name": dirname,
        "schedule": schedule,
        "lam": lam,
        "seed": 0,
        "f_sft_star": star[0],
        "f_pref_star": star[1],
        "final": {k: v for k, v in final.items() if k != "type"},
        "wall_s": 12.5,
        "steps": {"sft": final["steps_sft"], "pref": final["steps_pref"]},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    return [
        # Sequential: SFT first (f_sft falls), then DPO (f_pref falls, f_sft rises again).
        _make_run(tmp_path, "sequential", "sequential", 0.5,
                  [(3.1, 0.693), (2.4, 0.70), (2.2, 0.71), (2.5, 0.45), (3.0, 0.25), (3.4, 0.18)]),
        _make_run(tmp_path, "mix", "mix", 0.5,
                  [(3.1, 0.693), (2.7, 0.55), (2.5, 0.42), (2.4, 0.35), (2.35, 0.31)]),
        _make_run(tmp_path, "alright", "alright", 0.5,
                  [(3.1, 0.693), (2.8, 0.58), (2.55, 0.40), (2.45, 0.30), (2.4, 0.26)]),
    ]  # fmt: skip


def test_plot_runs_writes_valid_png_and_svg(three_runs: list[Path], tmp_path: Path) -> None:
    out = plot_runs(three_runs, tmp_path / "figs" / "tradeoff", title="demo")
    png, svg = tmp_path / "figs" / "tradeoff.png", tmp_path / "figs" / "tradeoff.svg"
    assert out == [png, svg]
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000

    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    ids = [el.get("id", "") for el in root.iter()]
    assert sorted(i for i in ids if re.fullmatch(r"run\d+-line", i)) == [
        "run0-line",
        "run1-line",
        "run2-line",
    ]
    assert sum(bool(re.fullmatch(r"run\d+-end", i)) for i in ids) == 3
    assert sum(bool(re.fullmatch(r"run\d+-start", i)) for i in ids) == 3
    assert "pareto-front" in ids
    assert "ideal0" in ids  # null f_*_star: the ideal is drawn at (0, 0)
    text = svg.read_text()
    for label in ("sequential (\u03bb=0.5)", "mix (\u03bb=0.5)", "alright (\u03bb=0.5)", "ideal"):
        assert label in text
    # The sequential run's switch from its SFT to its preference stage is marked.
    assert "run0-switch" in ids and "run1-switch" not in ids
    # these run directories' summaries say nothing of what f_sft / f_pref measure: generic labels
    assert "f_sft: held-out SFT loss" in text
    assert "f_pref: held-out preference loss" in text


def test_svg_output_is_deterministic(three_runs: list[Path], tmp_path: Path) -> None:
    a = plot_runs(three_runs, tmp_path / "a")[1].read_bytes()
    b = plot_runs(three_runs, tmp_path / "b")[1].read_bytes()
    assert a == b


def test_single_run_has_no_pareto_front(three_runs: list[Path], tmp_path: Path) -> None:
    svg = plot_runs(three_runs[:1], tmp_path / "one")[1]
    ids = {el.get("id", "") for el in ET.parse(svg).getroot().iter()}
    assert "run0-line" in ids and "run1-line" not in ids
    assert "pareto-front" not in ids


def test_load_run_reads_trajectory_and_ideal(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "cal", "maxright", 0.3, [(3.0, 0.69), (2.5, 0.4)], star=(2.2, 0.1))
    traj = load_run(run)
    assert traj.f_sft == [3.0, 2.5]
    assert traj.f_pref == [0.69, 0.4]
    assert traj.steps == [0, 10]
    assert traj.ideal == (2.2, 0.1)
    assert traj.label == "cal (maxright, \u03bb=0.3)"
    assert traj.stage_switch is None


def test_load_run_without_summary_uses_dir_name(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "partial", "mix", 0.5, [(3.0, 0.69), (2.5, 0.4)])
    (run / "summary.json").unlink()
    traj = load_run(run)
    assert traj.label == "partial"  # no summary: no schedule or lam to show
    assert traj.ideal == (0.0, 0.0)


def test_pareto_front_hand_made() -> None:
    points = [
        (1.0, 5.0),  # 0 front (best x)
        (2.0, 3.0),  # 1 front
        (2.0, 4.0),  # 2 dominated by 1 (tie in x, worse y)
        (3.0, 3.0),  # 3 dominated by 1 (tie in y, worse x)
        (4.0, 1.0),  # 4 front (best y)
        (2.0, 3.0),  # 5 identical to 1: neither dominates the other
        (5.0, 5.0),  # 6 dominated by everything
        (math.nan, 0.0),  # 7 NaN: never on the front
    ]
    assert pareto_front(points) == [0, 1, 4, 5]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (0.5, 0.5)]) == [1]
    assert pareto_front([(1.0, 2.0), (2.0, 1.0)]) == [0, 1]


def test_missing_metrics_names_run_dir(three_runs: list[Path], tmp_path: Path) -> None:
    (three_runs[1] / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(three_runs[1]))):
        plot_runs(three_runs, tmp_path / "x")
    assert not (tmp_path / "x.png").exists()


def test_empty_metrics_names_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(run))):
        plot_runs([run], tmp_path / "x")


def test_metrics_without_eval_lines_is_an_error(tmp_path: Path) -> None:
    run = tmp_path / "trainonly"
    run.mkdir()
    train = {"type": "train", "step": 1, "objective": "sft", "loss": 2.0, "lr": 1e-5,
             "tokens_per_s": 10.0}  # fmt: skip
    (run / "metrics.jsonl").write_text(json.dumps(train) + "\n")
    with pytest.raises(ValueError, match="no eval lines"):
        plot_runs([run], tmp_path / "x")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "bad", "mix", 0.5, [(3.0, 0.69)])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: bad JSON"):
        load_run(run)


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        plot_runs([tmp_path / "nope"], tmp_path / "x")


def test_stage_switch_of_sequential_run(three_runs: list[Path]) -> None:
    assert load_run(three_runs[0]).stage_switch == 2  # last eval before the preference stage
    assert load_run(three_runs[1]).stage_switch is None  # mix: both objectives from the start
