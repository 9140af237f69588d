"""The training step's profile (`train.profile`): exclusive phase seconds, the chunked head's
phases inside backward, the work counters, the memory floor, and a profiled run training
exactly as an unprofiled one."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import padded_batch, tiny_llama
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import parse_config
from unitune.core import phases as phases_mod
from unitune.core.phases import PHASES, Phases
from unitune.jobs import train
from unitune.models.logprobs import sequence_logps


@pytest.fixture
def clock(monkeypatch):
    """perf_counter under the test's control: `clock.t` seconds."""

    class Clock:
        t = 0.0

    monkeypatch.setattr(phases_mod.time, "perf_counter", lambda: Clock.t)
    return Clock


def test_nested_phases_keep_their_own_time(clock):
    p = Phases()
    p.enable()
    p.enter("forward")  # t=0
    clock.t = 1.0
    p.enter("head")
    clock.t = 1.5
    p.exit("head")
    clock.t = 3.0
    with p.phase("collate"):
        clock.t = 3.25
    clock.t = 4.0
    p.exit("forward")
    p.count("tokens", 10)
    p.count("tokens", 5)
    p.peak("bytes", 3)
    p.peak("bytes", 2)
    got = p.take()
    assert got["seconds"] == {"head": 0.5, "collate": 0.25, "forward": 3.25}
    assert got["counts"] == {"tokens": 15}
    assert got["peaks"] == {"bytes": 3}
    assert p.take() == {"seconds": {}, "counts": {}, "peaks": {}}  # take resets


def test_a_mismatched_exit_is_ignored_and_off_records_nothing(clock):
    p = Phases()
    p.enable()
    p.enter("backward")
    p.exit("head_backward")  # not the innermost: ignored
    clock.t = 2.0
    p.exit("backward")
    assert p.take()["seconds"] == {"backward": 2.0}
    p.disable()
    with p.phase("forward"):
        clock.t = 5.0
    p.count("tokens", 1)
    assert p.take() == {"seconds": {}, "counts": {}, "peaks": {}}


def test_the_heads_phases_inside_backward_and_the_counters():
    model = tiny_llama(vocab_size=64).train()
    b = padded_batch(64, rows=3, width=12, short_to=9, target_from=6)
    ids, mask, target = b["input_ids"], b["attention_mask"], b["target_mask"]
    plain, _ = sequence_logps(model, ids, mask, target, chunk_size=4)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    PHASES.enable()
    try:
        logp, _ = sequence_logps(model, ids, mask, target, chunk_size=4)
        logp.sum().backward()
        got = PHASES.take()
    finally:
        PHASES.disable()
    assert torch.equal(logp, plain)  # profiling changes nothing computed
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    rows = int((target[:, 1:].bool() & mask[:, 1:].bool()).sum())
    assert got["counts"] == {"tokens": float(mask.sum()), "padded_tokens": 36, "head_rows": rows}
    for name in ("head", "head_recompute", "head_backward"):
        assert got["seconds"][name] > 0, name
    # no grad (the reference's pass): counted apart, nothing recomputed
    PHASES.enable()
    try:
        with torch.no_grad():
            sequence_logps(model, ids, mask, target, chunk_size=4)
        got = PHASES.take()
    finally:
        PHASES.disable()
    assert set(got["counts"]) == {"nograd_tokens", "nograd_padded_tokens", "nograd_head_rows"}
    assert set(got["seconds"]) == {"head"}


def test_a_profiled_run_trains_the_same_and_reports_its_floor(tiny_config, tmp_path):
    raw = tiny_config("mix", max_steps=3, eval_every=1)  # evaluations between the steps
    plain = train(parse_config(raw), progress=False)
    raw["output_dir"] = str(tmp_path / "profiled")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(path), "--profile", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "profile: mean step of 2" in res.output and "memory floor" in res.output
    table = [line for line in res.output.splitlines() if "│" in line or "┃" in line]
    assert table and max(len(line) for line in table) <= 80
    out = Path(raw["output_dir"])
    summary = json.loads((out / "summary.json").read_text())
    timed = ("elapsed_s", "eval_s")
    same = {k: v for k, v in summary["final"].items() if k not in timed}
    assert same == {k: v for k, v in plain["final"].items() if k not in timed}  # bit for bit
    prof = summary["profile"]
    assert prof["steps"] == 2
    for name in ("collate", "forward", "head", "backward", "head_recompute", "head_backward",
                 "clip", "optimizer", "log", "other"):  # fmt: skip
        assert name in prof["seconds"], name
    assert prof["step_s"] == pytest.approx(sum(prof["seconds"].values()))
    assert prof["counts"]["tokens"] > 0 and prof["counts"]["head_rows"] > 0
    # the evaluations' no-grad passes between the steps are not counted as a step's work
    assert not [k for k in prof["counts"] if k.startswith("nograd")]
    mem = prof["memory_bytes"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "train" and "phase/forward_s" in x]
    assert len(steps) == 3  # one line per step carries its phases
    assert mem["weights"] > 0 and mem["gradients"] == mem["weights"]  # full fine-tuning
    # AdamW's two moments, fp32, and a 4-byte step count per parameter tensor
    assert 0 <= mem["optimizer"] - 2 * mem["weights"] <= 4 * 1000
    assert mem["activations"] > 0 and mem["runtime"] > 0
    assert mem["floor"] == sum(v for k, v in mem.items() if k != "floor")
