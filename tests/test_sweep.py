"""`unitune sweep`: the grid expands into named run directories, finished runs are skipped and an
interrupted one resumes, so a stopped sweep finishes only what was missing."""

import json
import os
import signal

import pytest
import yaml
from conftest import run_records
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import ConfigError, load_config
from unitune.study.sweep import commands, load_sweep, run_name, run_sweep


def write_sweep(tmp_path, tiny_config, **spec) -> str:
    base = tiny_config("mix", save_every=1, keep_last=2)
    base.pop("output_dir")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({"base": "base.yaml", "output_dir": str(tmp_path / "sw"), **spec})
    )
    return str(path)


def test_grid_times_runs_gives_one_named_validated_config_each(tmp_path, tiny_config):
    path = write_sweep(
        tmp_path, tiny_config,
        runs=[{"schedule.name": "mix"}, {"schedule.name": "maxright", "schedule.k": 2}],
        grid={"schedule.lam": [0.25, 0.75], "train.seed": [0, 1]},
    )  # fmt: skip
    sweep = load_sweep(path)
    names = [r.name for r in sweep.runs]
    assert names[:2] == ["schedule-mix_lam-0.25_seed-0", "schedule-mix_lam-0.25_seed-1"]
    assert len(names) == 8 and len(set(names)) == 8
    # k is set in one variant only: it varies, so it names the run
    assert "schedule-maxright_lam-0.75_seed-1_k-2" in names
    run = sweep.runs[-1]
    assert run.cfg.schedule.name == "maxright" and run.cfg.schedule.k == 2
    assert run.cfg.schedule.lam == 0.75 and run.cfg.train.seed == 1
    assert run.cfg.output_dir == str(tmp_path / "sw" / run.name) and run.cfg.name == run.name
    assert {r.status() for r in sweep.runs} == {"new"}
    # --print-commands: each line's config file is the run's resolved config
    lines = commands(sweep)
    assert len(lines) == 8 and all(line.startswith("unitune train ") for line in lines)
    assert load_config(lines[0].split()[2]) == sweep.runs[0].cfg
    plan = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["name"] for r in plan["runs"]] == names


def test_a_parallel_job_in_a_sweep_resumes_once_a_branch_has_started(tmp_path, tiny_config):
    """`job: parallel` is a variant like a schedule; its run resumes when a branch finished or
    left a checkpoint, though its own directory has neither."""
    base = tiny_config("mix")
    base.pop("output_dir")
    del base["schedule"]["name"]  # each variant names its schedule, or is the parallel job
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    runs = [{"schedule.name": "mix"}, {"job": "parallel", "parallel.l1": 1e-4}]
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": str(tmp_path / "sw"),
                                    "runs": runs}))  # fmt: skip
    mix, paft = load_sweep(path).runs
    assert mix.cfg.job == "train" and mix.cfg.schedule.name == "mix"
    assert paft.cfg.job == "parallel" and paft.cfg.parallel.l1 == 1e-4
    assert [mix.status(), paft.status()] == ["new", "new"]
    for run in (mix, paft):
        (run.out / "sft").mkdir(parents=True)
        (run.out / "sft" / "summary.json").write_text("{}")
    assert [mix.status(), paft.status()] == ["new", "resume"]


def test_ambiguous_key_names_keep_their_section():
    assert (
        run_name({"objectives.sft.name": "sft", "objectives.pref.name": "dpo"})
        == "sft-sft_pref-dpo"
    )
    assert run_name({"objectives.sft.beta": 0.1, "objectives.pref.beta": 0.2}) == (
        "sft-beta-0.1_pref-beta-0.2"
    )
    assert run_name({"train.lr": 1e-4, "data.sft.train": "a/b c.jsonl"}) == (
        "lr-0.0001_train-a-b-c.jsonl"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"schedule.lam": [0.5]}, "extra": 1}, "unknown key(s) extra"),
        ({"grid": {"schedule.lam": []}}, "grid: a mapping of config keys to non-empty lists"),
        ({"grid": {"schedule.lamb": [0.1, 0.2]}}, "run 0 (lamb-0.1)"),
        ({"grid": {"schedule.lam": [2.0, 0.5]}}, "run 0 (lam-2.0)"),
        ({"runs": [{"train.seed": 1}, {"train.seed": 1}]}, "set the same values"),
        ({"grid": {"output_dir": ["a", "b"]}}, "output_dir is set by the sweep"),
    ],
)
def test_bad_sweeps_name_the_file_run_and_key(tmp_path, tiny_config, spec, message):
    path = write_sweep(tmp_path, tiny_config, **spec)
    with pytest.raises(ConfigError, match=None) as err:
        load_sweep(path)
    assert message in str(err.value) and "sweep.yaml" in str(err.value)
    result = CliRunner().invoke(app, ["sweep", path, "--dry-run"])
    assert result.exit_code == 2 and message in flat(result.output)
    assert "Traceback" not in result.output


def test_an_interrupted_sweep_reruns_only_what_is_missing(tmp_path, tiny_config, monkeypatch):
    from unitune.core.interrupts import Interrupted
    from unitune.training.evaluator import Evaluator

    path = write_sweep(tmp_path, tiny_config, grid={"train.seed": [0, 1, 2]})
    sweep = load_sweep(path)
    evaluate = Evaluator.evaluate

    def stop_second_run_at_step_2(self, **kw):
        if self.session.cfg.train.seed == 1 and _step(self.session) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, **kw)

    monkeypatch.setattr(Evaluator, "evaluate", stop_second_run_at_step_2)
    with pytest.raises(Interrupted):
        run_sweep(sweep, progress=False)
    assert [r.status() for r in sweep.runs] == ["done", "resume", "new"]
    first = (sweep.runs[0].out / "summary.json").stat().st_mtime_ns

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    result = CliRunner().invoke(app, ["sweep", path, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 trained, 1 resumed, 1 skipped" in flat(result.output)
    assert (sweep.runs[0].out / "summary.json").stat().st_mtime_ns == first  # not rerun
    for run in sweep.runs:
        summary = json.loads((run.out / "summary.json").read_text())
        assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
        assert summary["peak_rss_mb"] > 100 and summary["peak_accelerator_mb"] is None
        steps = [r["step"] for r in run_records(run.out) if r["type"] == "train"]
        assert sorted(set(steps)) == [1, 2, 3, 4] and len(steps) == 8  # sft + pref, once each
    again = CliRunner().invoke(app, ["sweep", path, "--no-progress"])
    assert "0 trained, 0 resumed, 3 skipped" in flat(again.output)
    # an edited base config does not silently reuse runs made with the old one
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "eval": {"beta": 0.2}}))
    assert CliRunner().invoke(app, ["sweep", path, "--dry-run"]).exit_code == 0  # only shows
    edited = CliRunner().invoke(app, ["sweep", path])
    assert edited.exit_code == 2 and "was started with another config" in flat(edited.output)


def _step(run) -> int:
    """The step of the evaluation in progress, from the metrics log the trainer writes."""
    records = run_records(run.out)
    return max((r["step"] for r in records if r["type"] == "train"), default=0)


def flat(text: str) -> str:
    return " ".join(text.split())
