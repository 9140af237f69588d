"""`unitune eval` and `unitune chat` end to end on a saved builtin:tiny run directory, the
training loop's `generation_eval`, a run's held-out prompts, and the one-line errors."""

import json

import pytest
import yaml
from conftest import perturbed_tiny, write_jsonl
from judge_server import JudgeServer, closed_port, no_proxy  # noqa: F401 (autouse)
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import dump_config, parse_config
from unitune.data.holdout import split_holdout
from unitune.eval.chat import chat_loop
from unitune.eval.evaluate import generation_eval, load_target, run_prompts
from unitune.eval.generate import generate, load_prompts
from unitune.models.load import load_model
from unitune.models.save import save_model

runner = CliRunner()
KEY = "sk-cli-SECRET-777"


@pytest.fixture(scope="module")
def tiny():
    return perturbed_tiny()


@pytest.fixture
def run_dir(tiny, tiny_config, tmp_path):
    """A finished run's directory: config.yaml and a saved builtin:tiny as model/."""
    cfg = parse_config(tiny_config("alright"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_model(*tiny, run / "model")
    return run


def one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.output.startswith("error:") and needle in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_eval_on_a_run_directory(run_dir, tiny, tiny_data):
    res = runner.invoke(
        app,
        ["eval", str(run_dir), "--max-new-tokens", "6", "--tasks", "unitune_mc", "--limit", "4",
         "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    for key in ("win_rate", "win_rate_se", "wins", "ties", "losses", "n", "judge", "retention"):
        assert key in report
    assert report["n"] == 3 and report["judge"] == "demo"  # the run's pref eval file: 3 pairs
    assert report["wins"] + report["ties"] + report["losses"] == 3
    assert set(report["retention"]["unitune_mc"]) >= {"acc", "acc_norm"}
    rows = [json.loads(x) for x in (run_dir / "eval" / "generations.jsonl").open()]
    held = load_prompts(tiny_data["pref_eval"])
    assert [r["reference"] for r in rows] == [p.reference for p in held]
    model, tok = tiny
    expected = generate(model, tok, [p.prompt for p in held], max_new_tokens=6)
    assert [r["response"] for r in rows] == expected  # the saved model generates as the live one
    assert "win rate" in res.output and "unitune_mc" in res.output


def test_generation_eval_for_the_training_loop(tiny, tiny_data, tmp_path):
    model, tok = tiny
    held = load_prompts(tiny_data["pref_eval"])
    prompts, refs = [p.prompt for p in held], [p.reference for p in held]
    out = generation_eval(
        model, tok, prompts, refs, "demo", max_new_tokens=4, out_path=tmp_path / "g.jsonl"
    )
    assert set(out) == {"win_rate", "win_rate_se"}
    assert 0.0 <= out["win_rate"] <= 0.5  # the demo judge: at best a tie with its reference
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    # a perfect "model" (its responses are the references) ties every prompt
    from unitune.judges.registry import make_judge
    from unitune.judges.winrate import win_rate

    assert win_rate(make_judge("demo"), prompts, refs, refs).win_rate == 0.5


def test_a_runs_held_out_prompts_are_trainings(tiny_config, tiny_data):
    raw = tiny_config("alright")
    raw["data"]["pref"]["eval"] = None
    cfg = parse_config(raw)
    held = run_prompts(cfg)
    every = load_prompts(tiny_data["pref_train"])
    _, expected = split_holdout(every, cfg.data.pref.eval_fraction, cfg.train.seed)
    assert held == expected and len(held) == 2
    assert run_prompts(cfg, max_samples=1) == expected[:1]


def test_eval_of_a_model_name_with_a_prompts_file(tiny_data, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        ["eval", "builtin:tiny", "--prompts", str(tiny_data["sft_eval"]), "--max-samples", "2",
         "--max-new-tokens", "3", "-o", str(out), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 2 and report["retention"] == {}


def test_eval_with_an_openai_judge_keeps_the_key_secret(run_dir, monkeypatch):
    monkeypatch.setenv("CLI_JUDGE_KEY", KEY)
    with JudgeServer(verdict=lambda content: "A") as server:
        res = runner.invoke(
            app,
            ["eval", str(run_dir), "--judge", "openai:local", "--judge-url", server.url,
             "--judge-key-env", "CLI_JUDGE_KEY", "--max-new-tokens", "3", "--no-progress"],
        )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(server.requests) == 6  # 3 prompts, both orders
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert report["judge"] == "openai:local"
    assert report["win_rate"] == 0.5  # always "A": position bias only, every prompt a tie
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert files
    for path in [*files, run_dir / "config.yaml"]:
        assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in res.output


def test_chat_prints_one_reply_and_the_loop_keeps_history(run_dir, tiny):
    res = runner.invoke(app, ["chat", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    model, tok = tiny
    (expected,) = generate(model, tok, [[{"role": "user", "content": "Hi"}]], max_new_tokens=5)
    assert res.stdout.strip() == expected  # the reply alone on stdout (progress bars: stderr)

    lines = iter(["hello", "/reset", "again", "more", "/exit"])
    shown = []
    history = chat_loop(
        model, tok, system="Be brief.", max_new_tokens=3, read=lambda _: next(lines),
        write=shown.append, stream=False,
    )  # fmt: skip
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["again", "more"]
    assert "(conversation reset)" in shown

    def eof(_):
        raise EOFError

    assert chat_loop(model, tok, read=eof, write=shown.append, stream=False) == []


def test_chat_in_float32_packed_replies_as_the_model_does(run_dir, tiny):
    """`--dtype float32`: the packed copy (MKL's packed GEMM where torch has it) greedily gives
    the plain model's reply; `--dtype bfloat16` replies too; a bad dtype is one line."""
    args = ["chat", str(run_dir), "--prompt", "Hi", "--max-new-tokens", "5"]
    plain = runner.invoke(app, args)
    packed = runner.invoke(app, [*args, "--dtype", "float32"])
    assert packed.exit_code == 0, packed.output
    assert packed.stdout.strip() == plain.stdout.strip()
    bf16 = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert bf16.exit_code == 0, bf16.output
    one_line_error(runner.invoke(app, [*args, "--dtype", "fp8"]), "--dtype must be one of")


def test_eval_and_chat_bad_input_is_one_line(run_dir, tiny, tmp_path, tiny_data):
    one_line_error(runner.invoke(app, ["chat", str(tmp_path / "nope")]), "no such directory")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    one_line_error(runner.invoke(app, ["chat", str(pickles), "--prompt", "x"]), "pickle")
    one_line_error(
        runner.invoke(app, ["eval", str(pickles), "--prompts", "x.jsonl", "-o", "o"]), "pickle"
    )
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{"]
    )
    one_line_error(
        runner.invoke(app, ["eval", str(run_dir), "--prompts", str(bad)]), "bad.jsonl: line 2"
    )
    one_line_error(
        runner.invoke(app, ["eval", str(run_dir), "--prompts", str(tmp_path / "no.jsonl")]),
        "no such file",
    )
    url = f"http://127.0.0.1:{closed_port()}/v1"
    one_line_error(
        runner.invoke(app, ["eval", str(run_dir), "--judge", "openai:m", "--judge-url", url]),
        "cannot be reached",
    )
    one_line_error(runner.invoke(app, ["eval", str(run_dir), "--judge", "best"]), "unknown")
    one_line_error(runner.invoke(app, ["eval", "builtin:tiny"]), "give --prompts FILE")
    one_line_error(
        runner.invoke(app, ["eval", "builtin:tiny", "--prompts", str(tiny_data["pref_eval"])]),
        "-o DIR",
    )
    norun = tmp_path / "unfinished"
    norun.mkdir()
    (norun / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    one_line_error(runner.invoke(app, ["eval", str(norun)]), "has no model/")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "config.yaml").write_text(yaml.safe_dump({"data": {}, "nonsense": 1}))
    res = runner.invoke(app, ["eval", str(broken)])
    assert res.exit_code == 2 and "nonsense: unknown key" in res.output
    assert "Traceback" not in res.output
    assert not (run_dir / "eval").exists()  # nothing written by any failed command


def test_a_lora_run_directory_is_loaded_onto_its_base(tiny_config, tmp_path):
    raw = tiny_config("alright")
    raw["model"]["lora"] = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    cfg = parse_config(raw)
    model, tok = load_model(cfg.model)
    run = tmp_path / "lora_run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_model(model, tok, run / "model")
    assert (run / "model" / "adapter_config.json").is_file()
    target = load_target(str(run))
    assert target.config is not None and target.run_dir == run
    assert not hasattr(target.model, "peft_config")  # merged into a plain model
    prompt = [[{"role": "user", "content": "Hi"}]]
    assert generate(target.model, target.tokenizer, prompt, max_new_tokens=3) == generate(
        model, tok, prompt, max_new_tokens=3
    )
