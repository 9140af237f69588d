"""Signals and faults during a run: SIGTERM checkpoints and resumes exactly, SIGKILL during a
checkpoint write keeps the previous one, NaN/inf stops (or skips), a full disk is one line."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import final_weights, run_records
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import parse_config
from unitune.jobs import train
from unitune.training import checkpoint
from unitune.training.evaluator import Evaluator
from unitune.training.loop import NonFiniteError
from unitune.training.policy import Loss, Policy


def same_run(a: Path, b: Path) -> None:
    assert run_records(a) == run_records(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def child(args: list[str], tmp_path: Path, code: str | None = None) -> subprocess.Popen:
    """`unitune train ...` in a fresh process (or `code` that ends by running the CLI)."""
    env = {**os.environ, "UNITUNE_CACHE": str(tmp_path / "ucache"), "COLUMNS": "250"}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "unitune.cli",
                                                              *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    log, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if log.exists() and any(
            r.get("type") == "train" and r["step"] >= step
            for r in map(json.loads, log.read_text().splitlines())
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigterm_checkpoints_and_the_resumed_run_matches_the_uninterrupted_one(
    tiny_config, tmp_path
):
    raw = tiny_config("alright", max_steps=12, eval_every=4, save_every=100)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = Path(raw["output_dir"])
    proc = child(["train", str(path), "--no-progress"], tmp_path)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "resume with: unitune train" in output and "--resume" in output
    (ckpt,) = checkpoint.list_checkpoints(out)  # written on the signal, not by save_every
    stopped_at = checkpoint.verify(ckpt)["step"]
    assert 3 <= stopped_at < 12
    proc = child(["train", str(path), "--no-progress", "--resume"], tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert (
        f"resumed from {ckpt}" in output.replace("\n", "").replace(" ", "") or "resumed" in output
    )
    whole = {**raw, "output_dir": str(tmp_path / "whole")}
    train(parse_config(whole), progress=False)
    same_run(out, tmp_path / "whole")


KILL_DURING_SAVE = """
import sys, time
from unitune.training import checkpoint
write = checkpoint._write_safetensors
def slow(path, tensors, metadata=None):
    info = write(path, tensors, metadata)
    if "step-00000003" in str(path.parent) and path.name == "model.safetensors":
        print("WRITING", flush=True)
        time.sleep(600)
    return info
checkpoint._write_safetensors = slow
from unitune.cli import app
sys.argv = ["unitune", *sys.argv[1:]]
app()
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tiny_config, tmp_path):
    raw = tiny_config("maxright", max_steps=6, eval_every=2, save_every=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = Path(raw["output_dir"])
    proc = child(["train", str(path), "--no-progress"], tmp_path, code=KILL_DURING_SAVE)
    for line in proc.stdout:
        if "WRITING" in line:
            break
    proc.kill()  # SIGKILL, half-way through step 3's checkpoint
    proc.wait(timeout=30)
    latest = checkpoint.latest_checkpoint(out, log=lambda m: None)
    assert latest is not None and latest.step == 2
    train(parse_config(raw), progress=False, resume=True)
    train(parse_config({**raw, "output_dir": str(tmp_path / "whole")}), progress=False)
    same_run(out, tmp_path / "whole")


def nan_at(monkeypatch, step_call: int, slot: str = "sft") -> None:
    """Policy.loss of `slot` returns NaN on its `step_call`-th call."""
    original, calls = Policy.loss, {"n": 0}

    def loss(self, kind, idx):
        out = original(self, kind, idx)
        if kind == slot:
            calls["n"] += 1
            if calls["n"] == step_call:
                return Loss(out.value * float("nan"), out.tokens, out.figures)
        return out

    monkeypatch.setattr(Policy, "loss", loss)


def test_nonfinite_loss_stops_naming_step_objective_items_and_checkpoint(tiny_config, monkeypatch):
    raw = tiny_config("sft", max_steps=6, save_every=2)
    nan_at(monkeypatch, 3)
    with pytest.raises(NonFiniteError) as err:
        train(parse_config(raw), progress=False)
    msg = str(err.value)
    assert msg.startswith("step 3: non-finite sft loss on data.sft.train items [")
    assert "step-00000002" in msg and "on_nonfinite: skip" in msg


def test_nonfinite_skip_skips_the_update_and_reports_it(tiny_config, monkeypatch):
    raw = tiny_config("sft", max_steps=4, eval_every=4, on_nonfinite="skip")
    nan_at(monkeypatch, 2)
    summary = train(parse_config(raw), progress=False)
    assert summary["skipped_nonfinite"] == [2] and summary["steps"]["sft"] == 3
    assert all(torch.isfinite(t).all() for t in final_weights(Path(raw["output_dir"])).values())


def test_nonfinite_through_the_cli_is_one_line(tiny_config, tmp_path, monkeypatch):
    raw = tiny_config("sft", max_steps=3)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    nan_at(monkeypatch, 1)
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: step 1: non-finite sft loss" in result.output


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(
    tiny_config, tmp_path, monkeypatch
):
    raw = tiny_config("sft", max_steps=4, save_every=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    write = checkpoint._write_file

    def full(target, chunks):
        if "step-00000004" in str(target.parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(target, chunks)

    monkeypatch.setattr(checkpoint, "_write_file", full)
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "No space left on device" in result.output and "step 2 is intact" in result.output
    latest = checkpoint.latest_checkpoint(Path(raw["output_dir"]), log=lambda m: None)
    assert latest is not None and latest.step == 2


def test_a_signal_during_an_evaluation_is_answered_and_the_eval_redone_on_resume(
    tiny_config, tmp_path, monkeypatch
):
    """Evaluation polls the signal between batches (a run that never looked would train on);
    the step is checkpointed without save_every, and the resumed run redoes that evaluation."""
    from unitune.core.interrupts import Interrupted

    raw = tiny_config("mix", max_steps=4, eval_every=2)
    original, calls = Evaluator.evaluate, {"n": 0}

    def evaluate(self, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation after step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, **kw)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    with pytest.raises(Interrupted) as stopped:
        train(parse_config(raw), progress=False)
    assert stopped.value.checkpoint.step == 2 and stopped.value.signum == signal.SIGTERM
    monkeypatch.setattr(Evaluator, "evaluate", original)
    train(parse_config(raw), progress=False, resume=True)
    train(parse_config({**raw, "output_dir": str(tmp_path / "whole")}), progress=False)
    same_run(Path(raw["output_dir"]), tmp_path / "whole")
