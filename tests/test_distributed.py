"""Several processes (CPU, gloo, `torchrun`): the same run as one process with gradient
accumulation, every rank on the same schedule decision, one writer for every file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ANIMALS, final_weights, write_jsonl

from unitune.batches import BatchStream
from unitune.config import parse_config
from unitune.jobs import train


def test_ranks_draw_disjoint_batches_that_together_are_one_process_in_order():
    items = [[0] * (1 + i % 7) for i in range(22)]  # lengths vary: grouping matters
    from unitune.data import Sequence

    seqs = [Sequence(tuple(x), tuple([0] + [1] * (len(x) - 1))) for x in items]
    one = BatchStream(seqs, 3, seed=4)
    ranks = [BatchStream(seqs, 3, seed=4, rank=r, world=2) for r in (0, 1)]
    for _ in range(20):  # across several epochs of 8 batches
        a, b = next(ranks[0]), next(ranks[1])
        assert set(a).isdisjoint(b)
        assert (a, b) == (next(one), next(one))
    again = BatchStream(seqs, 3, seed=4, rank=1, world=2)
    again.load_state_dict(ranks[1].state_dict())
    assert next(again) == next(ranks[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, tmp_path: Path, nproc: int = 2) -> str:
    env = {**os.environ, "UNITUNE_CACHE": str(tmp_path / "ucache"), "COLUMNS": "250",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "unitune.cli", "train", str(config),
           "--no-progress"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def lines(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if r["type"] == kind]


@pytest.fixture
def label_files(tmp_path):
    rows = [{"prompt": f"Describe a {a}.", "completion": f" A {a} is {('dull', 'great')[i % 2]}.",
             "label": bool(i % 2)} for i, a in enumerate(ANIMALS * 2)]  # fmt: skip
    return write_jsonl(tmp_path / "fb.jsonl", rows[:20]), write_jsonl(
        tmp_path / "fbe.jsonl", rows[20:]
    )


@pytest.mark.parametrize(
    "schedule", ["sft", "pref", "sequential", "mix", "alright", "maxright", "kto"]
)
def test_two_processes_equal_one_process_with_accumulation(
    tiny_config, tmp_path, label_files, schedule
):
    """2 processes x batch b against 1 process x batch b x grad_accum 2 over the same batches.
    DDP averages the ranks' gradients by an all-reduce where one process sums scaled micro-batch
    gradients: the same sum in another order, so values agree to float32 rounding, compounded
    over a few Adam steps (rtol 1e-4), and the schedule's decisions agree exactly. Adam scales each
    update to about `lr` whatever the gradient's size, so the rounding of a near-zero gradient
    entry can move that weight by a fraction of `lr`: weights agree to 1 % of one step."""
    raw = tiny_config("alright" if schedule == "kto" else schedule, max_steps=4, batch_size=2,
                      eval_every=2)  # fmt: skip
    if schedule == "kto":  # unpaired data, with KTO's mismatched pairs over a fixed partition
        raw["data"]["pref"] = {"train": str(label_files[0]), "eval": str(label_files[1])}
        raw["objectives"] = {"pref": {"name": "kto"}}
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(raw))
    output = torchrun(two, tmp_path)
    assert "2 per process x 2 processes x 1 accumulation = 4 per step" in output
    out2 = Path(raw["output_dir"])
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    refs = sorted((Path(raw["cache_dir"]) / "refs").iterdir())
    one = {**raw, "output_dir": str(tmp_path / "one"),
           "train": {**raw["train"], "grad_accum": 2}}  # fmt: skip
    train(parse_config(one), progress=False)
    out1 = tmp_path / "one"
    # the reference pass ran once, and its cache entries are the ones one process uses (only
    # sequential's switched reference, taken from weights that differ by rounding, is new)
    after = sorted((Path(raw["cache_dir"]) / "refs").iterdir())
    assert set(refs) <= set(after) and len(after) == len(refs) + (schedule == "sequential")
    t1, t2 = lines(out1, "train"), lines(out2, "train")
    assert [(r["step"], r["objective"]) for r in t1] == [(r["step"], r["objective"]) for r in t2]
    for a, b in zip(t1, t2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for a, b in zip(lines(out1, "eval"), lines(out2, "eval"), strict=True):
        assert b["f_sft"] == pytest.approx(a["f_sft"], rel=1e-4)
        assert b["f_pref"] == pytest.approx(a["f_pref"], rel=1e-4)
    w1, w2 = final_weights(out1), final_weights(out2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=0.01 * raw["train"]["lr"])
