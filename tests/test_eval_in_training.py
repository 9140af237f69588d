"""`eval.generate` and `eval.retention_tasks` during training: the win rate at every evaluation
(generations saved beside the metrics), retention on the final model in summary.json."""

import json

import pytest
import yaml
from conftest import run_records
from judge_server import JudgeServer, no_proxy  # noqa: F401 (autouse)
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import parse_config
from unitune.jobs import train
from unitune.training import checkpoint


@pytest.fixture
def generating(tiny_config):
    raw = tiny_config("mix", max_steps=2, eval_every=1)
    raw["eval"] = {"generate": True, "judge": "demo", "generate_samples": 3, "max_new_tokens": 4,
                   "retention_tasks": ["unitune_mc"], "retention_limit": 4}  # fmt: skip
    return raw


def test_win_rate_at_every_evaluation_and_retention_at_the_end(generating, tmp_path):
    summary = train(parse_config(generating), progress=False)
    out = tmp_path / "runs" / "mix"
    evals = [r for r in run_records(out) if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert 0.0 <= e["win_rate"] <= 1.0 and e["win_rate_se"] >= 0.0
        rows = [json.loads(x) for x in (out / "generations" / f"step-{e['step']:08d}.jsonl").open()]
        assert len(rows) == 3 and all({"prompt", "response", "reference"} <= set(r) for r in rows)
    # the references are the held-out pairs' chosen responses
    assert rows[0]["reference"] == "A hen is a WONDERFUL animal!"
    assert summary["final"]["win_rate"] == evals[-1]["win_rate"]
    acc = summary["retention"]["unitune_mc"]["acc"]
    assert 0.0 <= acc <= 1.0


def test_a_bad_judge_stops_before_training(generating):
    from unitune.config import ConfigError

    generating["eval"]["judge"] = "nonsense:thing"
    with pytest.raises(ConfigError, match="judge 'nonsense:thing': unknown kind"):
        parse_config(generating)


def test_win_rate_against_the_starting_model(generating, tmp_path):
    """`eval.win_rate_against: base`: judged against the starting model's own responses, the
    start is exactly a tie (its responses are reused, not generated again)."""
    generating["eval"] |= {"win_rate_against": "base", "retention_tasks": []}
    train(parse_config(generating), progress=False)
    out = tmp_path / "runs" / "mix"
    evals = [r for r in run_records(out) if r["type"] == "eval"]
    assert evals[0]["win_rate"] == 0.5 and evals[0]["win_rate_se"] == 0.0
    assert all(0.0 <= e["win_rate"] <= 1.0 for e in evals[1:])
    # generated once, cached by the starting weights, precision, prompts and settings: a second
    # run with another schedule reuses them and gives the same start
    cached = list((tmp_path / "cache" / "generations").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 3
    other = {
        **generating,
        "schedule": {"name": "alright", "lam": 0.5},
        "output_dir": str(out) + "2",
    }
    train(parse_config(other), progress=False)
    assert list((tmp_path / "cache" / "generations").glob("*.json")) == cached
    assert [r for r in run_records(out.with_name("mix2")) if r["type"] == "eval"][0][
        "win_rate"
    ] == 0.5


def test_pointwise_win_rate_against_opponents_scores_both_on_the_references():
    from unitune.judges.registry import make_judge
    from unitune.judges.winrate import win_rate

    judge = make_judge("demo")
    prompts = [[{"role": "user", "content": "Who resigned?"}]] * 2
    gold = ["Ahoy! Richard Nixon, matey!"] * 2
    ours = ["Ahoy! Richard Nixon, matey!", "Nixon"]
    base = ["Richard Nixon", "Richard Nixon"]
    got = win_rate(judge, prompts, ours, gold, opponents=base)
    # styled and right beats plain and right; half the content and no style loses to it
    assert got.outcomes == (1.0, 0.0) and got.win_rate == 0.5
    assert win_rate(judge, prompts, ours, gold).outcomes == (0.5, 0.0)  # against the gold itself


def test_a_judge_that_fails_during_training_checkpoints_the_step_first(
    generating, tmp_path, monkeypatch
):
    """An OpenAI-compatible judge reachable at the start and unreachable at the evaluation of
    step 1: the step is checkpointed, then one line names the judge and the checkpoint (no
    traceback, nonzero exit); the run resumes from it once a judge answers."""
    from unitune.training.evaluator import Evaluator

    server = JudgeServer(verdict=lambda content: "A").__enter__()
    original = Evaluator.evaluate

    def evaluate(self, **kw):
        out = original(self, **kw)
        server.httpd.shutdown()  # after the evaluation at the start: nothing listens any more
        server.httpd.server_close()
        return out

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    monkeypatch.setenv("UNITUNE_TEST_JUDGE_KEY", "sk-test")
    generating["eval"] |= {
        "judge": "openai:judge-model",
        "judge_url": server.url,
        "judge_key_env": "UNITUNE_TEST_JUDGE_KEY",
        "retention_tasks": [],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(generating))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    out = tmp_path / "runs" / "mix"
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and ckpt.step == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "eval.judge openai:judge-model" in errors[0] and str(ckpt.path) in errors[0]
    assert "step 1 checkpointed" in errors[0]
    # the step's evaluation was not logged; the resumed run redoes it, with a judge that answers
    assert [r["step"] for r in run_records(out) if r["type"] == "eval"] == [0]
    monkeypatch.setattr(Evaluator, "evaluate", original)
    with JudgeServer(verdict=lambda content: "A") as again:
        generating["eval"]["judge_url"] = again.url
        path.write_text(yaml.safe_dump(generating))
        result = CliRunner().invoke(app, ["train", str(path), "--no-progress", "--resume"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in run_records(out) if r["type"] == "eval"] == [0, 1, 2]
