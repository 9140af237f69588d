"""`unitune report`: finding and grouping runs by seed, mean ± std, the Pareto front of groups,
the λ table, the CSV / JSON files, parallel branches, bad input, and the HTML page in headless
Chromium. Every run directory here is written by hand (no training)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from unitune import cli
from unitune.cli import app
from unitune.study.plots import load_run
from unitune.study.report import ReportError, build_report
from unitune.study.report.collect import find_runs, group_runs, read_run
from unitune.study.report.stats import compute, mean_std, pareto_groups

runner = CliRunner()
STAR = (1.5, 0.1)


def make_run(
    root: Path,
    rel: str,
    *,
    schedule: str = "mix",
    lam: float = 0.5,
    seed: int = 0,
    f_sft: float = 2.0,
    f_pref: float = 0.3,
    lr: float = 5e-5,
    star: tuple[float, float] = STAR,
    name: str | None = None,
    config: bool = True,
    summary_extra: dict | None = None,
    gen_eval: dict | None = None,
) -> Path:
    """A run directory as `unitune train` leaves it: config.yaml, metrics.jsonl, summary.json."""
    run = root / rel
    run.mkdir(parents=True)
    cfg = {
        "name": name or f"{schedule}-s{seed}",
        "model": {"name": "builtin:tiny"},
        "schedule": {"name": schedule, "lam": lam},
        "parallel": {"merge": {"seed": 0}},
        "train": {"max_steps": 20, "lr": lr, "seed": seed},
        "output_dir": str(run),
        "cache_dir": f"/tmp/cache-{seed}",
    }
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    evals = []
    for k, step in enumerate((0, 10, 20)):
        t = k / 2  # from the start (3.0, 0.69) to the final values
        fs, fp = 3.0 + t * (f_sft - 3.0), 0.69 + t * (f_pref - 0.69)
        evals.append({"type": "eval", "step": step, "f_sft": fs, "f_pref": fp,
                      "reward_acc": 0.5 + t / 4, "ideal_distance": math.hypot(fs - star[0],
                      fp - star[1]), "steps_sft": step // 2, "steps_pref": step // 2,
                      "eval_s": 0.5, "elapsed_s": 1.0 + step})  # fmt: skip
    train = {"type": "train", "step": 1, "objective": "sft", "loss": 2.0, "lr": lr}
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [train, *evals]))
    summary = {
        "name": name or f"{schedule}-s{seed}",
        "schedule": schedule,
        "lam": lam,
        "seed": seed,
        "sft_objective": "sft",
        "pref_objective": "dpo",
        "f_sft_star": star[0],
        "f_pref_star": star[1],
        "measures": {"f_sft": "held-out NLL per response token", "f_pref": "held-out DPO loss"},
        "final": {k: v for k, v in evals[-1].items() if k != "type"},
        "wall_s": 10.0 + seed,
        "train_s": 8.0 + seed,
        "eval_s": 1.5,
        "steps": {"sft": 10, "pref": 10},
        "data": {},
        **(summary_extra or {}),
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if gen_eval is not None:
        (run / "eval.json").write_text(json.dumps(gen_eval))
    return run


def make_parallel(root: Path, rel: str, *, seed: int, f_sft: float, f_pref: float) -> Path:
    """A PAFT run directory as written before `parallel` was a job: summary.json and
    metrics.jsonl of its own (no config.yaml, no `job` in its summary), and its sft/ and pref/
    branches, ordinary run directories."""
    run = make_run(root, rel, schedule="parallel", seed=seed, f_sft=f_sft, f_pref=f_pref,
                   config=False)  # fmt: skip
    for kind in ("sft", "pref"):
        br = make_run(run, kind, schedule=kind, seed=seed, f_sft=f_sft - 0.3, f_pref=0.9)
        cfg = yaml.safe_load((br / "config.yaml").read_text())
        cfg["train"]["save_model"] = True
        cfg["schedule"]["lam"] = 0.5
        (br / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def gen(win: float) -> dict:
    return {"win_rate": win, "win_rate_se": 0.05, "wins": 6, "ties": 1, "losses": 3, "n": 10,
            "judge": "reward-model", "retention": {"arc_easy": {"acc": win / 2}}}  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory names in no useful order, so that order comes from the report itself."""
    root = tmp_path_factory.mktemp("sweep")
    cost = {"tokens": 4000, "peak_accelerator_mb": None}
    make_run(root, "r07", lam=0.75, seed=0, f_sft=2.6, f_pref=0.20)
    make_run(root, "r02", lam=0.25, seed=0, f_sft=1.9, f_pref=0.50)
    for seed, (fs, fp) in enumerate([(2.0, 0.30), (2.2, 0.32), (2.4, 0.34)]):
        make_run(root, f"r1{seed}", lam=0.5, seed=seed, f_sft=fs, f_pref=fp,
                 name="<b>x&y</b>" if seed == 2 else None,
                 summary_extra={**cost, "tokens_per_s": 100.0 * (seed + 1),
                                "peak_rss_mb": 900.0 + seed},
                 gen_eval=gen(0.6 + seed / 10))  # fmt: skip
    make_run(root, "r05", lam=0.75, seed=1, f_sft=2.8, f_pref=0.22)
    make_run(root, "deeper/r01", schedule="alright", seed=0, f_sft=2.5, f_pref=0.4)
    make_parallel(root, "r03", seed=0, f_sft=2.1, f_pref=0.6)
    cfg = root / "r11" / "config.yaml"  # the html-hostile name in the config text too
    cfg.write_text(cfg.read_text().replace("name: mix-s1", "name: <script>alert(1)</script>"))
    (root / "notes").mkdir()  # a directory with no run in it
    return root


@pytest.fixture(scope="module")
def report(sweep: Path) -> tuple[Path, str]:
    """The report of the sweep, through the command line."""
    out = sweep.parent / (sweep.name + "-report")
    with pytest.MonkeyPatch.context() as mp:  # wide enough that no table cell is folded
        mp.setattr(cli, "console", Console(width=250))
        res = runner.invoke(app, ["report", str(sweep), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_mean_std_of_hand_made_numbers() -> None:
    ms = mean_std([1.0, 2.0, 4.0])
    assert ms is not None and ms.n == 3
    assert ms.mean == pytest.approx(7 / 3)
    assert ms.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                              + (4 - 7 / 3) ** 2) / 2))  # fmt: skip
    one = mean_std([5.0])
    assert one is not None and one.std is None and one.n == 1
    assert one.text() == "5.0000 \u00b1 \u2013"  # no std of one run, not 0
    assert mean_std([None, math.nan]) is None
    two = mean_std([1.0, math.nan, 3.0, None])  # NaN and missing values left out
    assert two is not None and (two.mean, two.n) == (2.0, 2) and two.std == pytest.approx(2**0.5)


def test_pareto_front_of_hand_made_points() -> None:
    points = {
        "a": (1.0, 5.0),  # front (best f_sft)
        "b": (2.0, 3.0),  # front
        "c": (3.0, 3.0),  # dominated by b
        "d": (4.0, 1.0),  # front (best f_pref)
        "e": (2.5, 3.5),  # dominated by b
        "f": (math.nan, 0.0),  # never on the front
    }
    assert pareto_groups(points) == ["a", "b", "d"]
    assert pareto_groups({"x": (4.0, 1.0), "y": (1.0, 4.0)}) == ["y", "x"]  # by f_sft


def test_runs_differing_only_in_seed_are_one_group(sweep: Path) -> None:
    found, notes = find_runs([sweep])
    assert not notes
    names = sorted(p.relative_to(sweep).as_posix() for p in found)
    assert names == ["deeper/r01", "r02", "r03", "r05", "r07", "r10", "r11", "r12"]
    groups = group_runs([read_run(p) for p in found])
    labels = [g.label for g in groups]
    # mix first (schedule order), then alright, then parallel; mix by λ
    assert labels == [
        "mix \u03bb=0.25",
        "mix \u03bb=0.5",
        "mix \u03bb=0.75",
        "alright \u03bb=0.5",
        "parallel \u03bb=0.5",
    ]
    by_label = {g.label: g for g in groups}
    assert by_label["mix \u03bb=0.5"].seeds == [0, 1, 2]  # names and output dirs differ too
    assert by_label["mix \u03bb=0.75"].seeds == [0, 1]
    assert all("seed" not in json.dumps(g.config.get("train", {})) for g in groups)


def test_another_setting_is_another_group_and_named_in_the_label(tmp_path: Path) -> None:
    make_run(tmp_path, "a", seed=0)
    make_run(tmp_path, "b", seed=1)
    make_run(tmp_path, "c", seed=0, lr=1e-4)
    make_run(tmp_path, "d", schedule="alright", seed=0)
    found, _ = find_runs([tmp_path])
    groups = group_runs([read_run(p) for p in found])
    labels = {g.label: len(g.runs) for g in groups}
    # the lr differs among the mix groups only: it is in their labels and series, not alright's
    assert labels == {
        "mix \u03bb=0.5 train.lr=5e-05": 2,
        "mix \u03bb=0.5 train.lr=0.0001": 1,
        "alright \u03bb=0.5": 1,
    }
    assert {g.series for g in groups} == {"mix train.lr=5e-05", "mix train.lr=0.0001", "alright"}
    assert sorted(g.differs.get("train.lr", 0) for g in groups) == [0, 5e-05, 0.0001]


def test_parallel_branches_are_not_runs(tmp_path: Path) -> None:
    make_parallel(tmp_path, "p0", seed=0, f_sft=2.1, f_pref=0.6)
    make_parallel(tmp_path, "p1", seed=1, f_sft=2.3, f_pref=0.5)
    found, _ = find_runs([tmp_path])
    assert found == [tmp_path / "p0", tmp_path / "p1"]
    run = read_run(found[0])
    assert run.schedule == "parallel" and run.config_source == "sft/config.yaml"
    assert run.config["schedule"]["name"] == "parallel"
    groups = group_runs([read_run(p) for p in found])
    assert [(g.label, g.seeds) for g in groups] == [("parallel \u03bb=0.5", [0, 1])]
    assert set(load_run(found[0]).branches) == {"sft", "pref"}  # known by its schedule
    # a branch named on its own is a run of its own
    assert find_runs([tmp_path / "p0" / "sft"])[0] == [tmp_path / "p0" / "sft"]


def test_a_parallel_job_s_run_is_grouped_by_its_own_config(tmp_path: Path) -> None:
    """A parallel job's run directory: its config.yaml (`job: parallel`), its summary's `job` and
    `schedule` both "parallel", and its branches, which are not runs."""
    for seed in (0, 1):
        run = make_run(tmp_path, f"p{seed}", schedule="parallel", seed=seed, f_sft=2.1, f_pref=0.6,
                       summary_extra={"job": "parallel"})  # fmt: skip
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["job"] = "parallel"
        del cfg["schedule"]["name"]
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        for kind in ("sft", "pref"):
            make_run(run, kind, schedule=kind, seed=seed, f_sft=1.8, f_pref=0.9)
    make_run(tmp_path, "m0", seed=0, f_sft=2.0, f_pref=0.3)
    found, _ = find_runs([tmp_path])
    assert found == [tmp_path / "m0", tmp_path / "p0", tmp_path / "p1"]
    run = read_run(tmp_path / "p0")
    assert run.schedule == "parallel" and run.config_source == "config.yaml"
    assert run.config["job"] == "parallel"
    groups = group_runs([read_run(p) for p in found])
    assert [(g.label, g.seeds) for g in groups] == [
        ("mix λ=0.5", [0]),
        ("parallel λ=0.5", [0, 1]),
    ]
    assert set(load_run(tmp_path / "p0").branches) == {"sft", "pref"}


def test_run_in_progress_is_skipped_with_a_note(tmp_path: Path) -> None:
    make_run(tmp_path, "done")
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "config.yaml").write_text("name: x\n")
    found, notes = find_runs([tmp_path])
    assert found == [tmp_path / "done"]
    assert len(notes) == 1 and "running" in notes[0] and "no summary.json" in notes[0]


def test_runs_that_disagree_on_the_ideal_point_are_noted(tmp_path: Path) -> None:
    make_run(tmp_path, "a", seed=0)
    make_run(tmp_path, "b", seed=1, star=(0.0, 0.0))
    make_run(tmp_path, "c", schedule="alright")
    stats = compute(group_runs([read_run(p) for p in find_runs([tmp_path])[0]]))
    assert stats.ideal == {"g1": None, "g2": STAR}
    text = " ".join(stats.notes)
    assert "mix \u03bb=0.5: its runs disagree on the ideal point" in text
    assert "runs disagree on the ideal point" in text and "(1.5, 0.1)" in text


def test_lambda_table_is_sorted_by_lambda(report: tuple[Path, str]) -> None:
    out, _ = report
    data = json.loads((out / "report.json").read_text())
    table = next(t for t in data["tables"] if t["name"] == "tradeoff")
    rows = [(r[0], r[1], r[2]) for r in table["rows"]]
    assert rows == [
        ("mix", "0.25", "1"),
        ("mix", "0.5", "3"),
        ("mix", "0.75", "2"),
        ("alright", "0.5", "1"),
        ("parallel", "0.5", "1"),
    ]
    assert data["tradeoff"] == {"mix": ["g1", "g2", "g3"], "alright": ["g4"], "parallel": ["g5"]}


def test_csv_and_json_content(report: tuple[Path, str]) -> None:
    out, _ = report
    with (out / "groups.csv").open() as fh:
        groups = {row["label"]: row for row in csv.DictReader(fh)}
    assert list(groups) == ["mix \u03bb=0.25", "mix \u03bb=0.5", "mix \u03bb=0.75",
                            "alright \u03bb=0.5", "parallel \u03bb=0.5"]  # fmt: skip
    mix = groups["mix \u03bb=0.5"]
    assert (mix["n"], mix["seeds"], mix["schedule"], mix["lam"]) == ("3", "0 1 2", "mix", "0.5")
    assert float(mix["f_sft_mean"]) == pytest.approx(2.2)
    assert float(mix["f_sft_std"]) == pytest.approx(0.2)
    assert float(mix["f_pref_mean"]) == pytest.approx(0.32)
    assert float(mix["win_rate_mean"]) == pytest.approx(0.7)
    assert float(mix["win_rate_std"]) == pytest.approx(0.1)
    assert float(mix["retention:arc_easy:acc_mean"]) == pytest.approx(0.35)
    assert float(mix["tokens_per_s_mean"]) == pytest.approx(200.0)
    assert float(mix["peak_rss_mb_std"]) == pytest.approx(1.0)
    assert float(mix["wall_s_mean"]) == pytest.approx(11.0)
    assert mix["pareto_front"] == "True" and groups["alright \u03bb=0.5"]["pareto_front"] == "False"
    assert (mix["f_sft_star"], mix["f_pref_star"]) == ("1.5", "0.1")
    one = groups["mix \u03bb=0.25"]
    assert one["f_sft_std"] == "" and one["f_sft_n"] == "1"  # no std of one run
    assert one["win_rate_mean"] == "" and one["win_rate_n"] == "0"  # no eval.json
    assert "peak_accelerator_mb_mean" not in mix  # null everywhere (CPU): no column
    assert "step_mean" not in mix and "elapsed_s_mean" not in mix  # bookkeeping, not metrics

    with (out / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 8  # the parallel run's branches are not runs
    r10 = next(r for r in runs if r["run_dir"].endswith("r10"))
    assert (r10["group"], r10["seed"], r10["judge"]) == ("g2", "0", "reward-model")
    assert float(r10["win_rate"]) == pytest.approx(0.6)

    data = json.loads((out / "report.json").read_text())
    assert data["pareto_front"] == ["g1", "g2", "g3"]  # mix λ=0.25, 0.5, 0.75
    g2 = data["groups"][1]
    assert g2["stats"]["f_sft"]["n"] == 3
    assert g2["stats"]["f_sft"]["std"] == pytest.approx(0.2)
    assert data["groups"][0]["stats"]["f_sft"]["std"] is None
    assert g2["trajectory"]["f_sft"]["step"] == [0, 10, 20]
    assert g2["trajectory"]["f_sft"]["mean"][-1] == pytest.approx(2.2)
    assert "train" in g2["config"] and "seed" not in g2["config"]["train"]
    assert "output_dir" not in g2["config"] and "name" not in g2["config"]
    assert data["columns"]["metrics"][:4] == ["f_sft", "f_pref", "ideal_distance", "reward_acc"]
    assert "retention:arc_easy:acc" in data["columns"]["metrics"]
    assert data["columns"]["cost"] == ["wall_s", "train_s", "eval_s", "tokens", "tokens_per_s",
                                       "peak_rss_mb"]  # fmt: skip
    assert data["notes"] == []
    assert sorted(data["figures"]) == sorted(
        f"{s}.{e}" for s in ("front", "lambda", "trajectories") for e in ("png", "svg")
    )


def test_console_output_and_figures(report: tuple[Path, str]) -> None:
    out, output = report
    assert "Pareto front" in output and "trade-off" in output and "Ideal distance" in output
    assert "2.2000 \u00b1 0.2000" in output and "\u2013" in output
    assert f"report: {out / 'index.html'}" in output.replace("\n", "")
    for stem in ("front", "lambda", "trajectories"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = {el.get("id", "") for el in ET.parse(out / "front.svg").getroot().iter()}
    assert {"g1-mean", "g5-mean", "series0-line", "pareto-front", "ideal0"} <= ids
    assert "series1-line" not in ids  # alright: one λ, no line
    svg = (out / "front.svg").read_text()
    for text in ("\u03bb=0.5 (n=3)", "alright \u03bb=0.5 (n=1)", "ideal", "Pareto front"):
        assert text in svg
    ids = {el.get("id", "") for el in ET.parse(out / "trajectories.svg").getroot().iter()}
    assert {"g2-f_sft", "g2-f_pref", "g2-ideal_distance"} <= ids


def test_bad_input_is_one_line_naming_the_file(tmp_path: Path) -> None:
    def fails(*args: str) -> str:
        res = runner.invoke(app, ["report", *args, "-o", str(tmp_path / "out")])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and res.output.startswith("error:")
        return " ".join(res.output.split())

    assert "nope: no such directory" in fails(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no summary.json found under" in fails(str(tmp_path / "empty"))
    bad = make_run(tmp_path, "sweep/bad")
    (bad / "summary.json").write_text("{not json")
    assert re.search(r"bad/summary\.json: bad JSON", fails(str(tmp_path / "sweep")))
    bad = make_run(tmp_path, "sweep2/bad")
    (bad / "config.yaml").write_text("a: [1\n")
    assert re.search(r"bad/config\.yaml: bad YAML", fails(str(tmp_path / "sweep2")))
    bad = make_run(tmp_path, "sweep3/bad")
    with (bad / "metrics.jsonl").open("a") as fh:
        fh.write("{oops\n")
    assert re.search(r"bad/metrics\.jsonl:5: bad JSON", fails(str(tmp_path / "sweep3")))
    bad = make_run(tmp_path, "sweep4/bad")
    (bad / "eval.json").write_bytes(b"\xff\xfe")
    assert re.search(r"bad/eval\.json: cannot read", fails(str(tmp_path / "sweep4")))
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ReportError, match="no summary.json"):
        build_report([tmp_path / "empty"], tmp_path / "out")


def test_html_is_static_and_escaped(report: tuple[Path, str]) -> None:
    out, _ = report
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", page)  # nothing remote
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # r11's config text, escaped
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["front.png", "lambda.png", "trajectories.png"]
    assert page.count("<details>") == 8
    for name in ("groups.csv", "runs.csv", "report.json"):
        assert f'href="{name}"' in page


CHECK = """<script>
console.log("unitune-probe");
const failed = [];
window.addEventListener("error", (e) => failed.push(String(e.target.src || e.message)), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src);
  const div = document.createElement("div");
  div.id = "status";
  div.textContent = `imgs=${imgs.length} broken=${broken.length + failed.length} ` +
    `details=${document.querySelectorAll("details").length} [${broken.concat(failed)}]`;
  document.body.appendChild(div);
});
</script>
"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe is not None
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--disable-extensions", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH")
def test_html_renders_in_headless_chromium(report: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = report
    # The page as it is, plus a probe script: images decoded, no load errors, console captured.
    page = (out / "index.html").read_text()
    (out / "_check.html").write_text(page.replace("</body>", CHECK + "</body>"))
    res = _chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                     "--dump-dom", (out / "_check.html").as_uri()], tmp_path)  # fmt: skip
    (out / "_check.html").unlink()
    status = re.search(r'<div id="status">([^<]*)</div>', res.stdout)
    assert status, f"no status in the DOM; stderr:\n{res.stderr[-3000:]}"
    assert status.group(1).startswith("imgs=3 broken=0 details=8"), status.group(1)
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]
    assert any("unitune-probe" in ln for ln in console), res.stderr[-3000:]  # logging works
    assert [ln for ln in console if "unitune-probe" not in ln] == []  # and nothing else

    shot = tmp_path / "shot.png"
    args = [f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars",
            "--virtual-time-budget=10000", (out / "index.html").as_uri()]  # fmt: skip
    res = _chromium(args, tmp_path)
    assert shot.is_file(), res.stderr[-3000:]
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.05  # not one colour
    assert len({tuple(p) for p in rgb[::97].round(2).tolist()}) > 20  # text, tables, plots
