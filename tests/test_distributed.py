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
from safetensors.torch import load_file

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


# the runs of several configs in one launch of 2 processes (imports and start-up paid once)
MANY = """
import sys
from unitune.config import load_config
from unitune.jobs import train
for path in sys.argv[1:]:
    train(load_config(path), progress=False)
"""


def torchrun(configs: list[Path], tmp_path: Path, nproc: int = 2) -> str:
    env = {**os.environ, "UNITUNE_CACHE": str(tmp_path / "ucache"), "COLUMNS": "250",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = tmp_path / "many.py"
    script.write_text(MANY)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *map(str, configs)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
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


SCHEDULES = ["sft", "pref", "sequential", "mix", "alright", "maxright", "kto"]


def test_two_processes_equal_one_process_with_accumulation(tiny_config, tmp_path, label_files):
    """For every schedule (and KTO's unpaired data with its mismatched pairs): 2 processes x
    batch b against 1 process x batch b x grad_accum 2 over the same batches.
    DDP averages the ranks' gradients by an all-reduce where one process sums scaled micro-batch
    gradients: the same sum in another order, so values agree to float32 rounding, compounded
    over a few Adam steps (rtol 1e-4), and the schedule's decisions agree exactly. Adam scales each
    update to about `lr` whatever the gradient's size, so the rounding of a near-zero gradient
    entry can move that weight by a fraction of `lr`: weights agree to 1 % of one step."""
    raws = {}
    for schedule in SCHEDULES:
        # a warm-up and a decaying LR: each step moves the schedule once, whatever the processes
        raw = tiny_config("alright" if schedule == "kto" else schedule, max_steps=4,
                          batch_size=2, eval_every=2, lr_schedule="linear",
                          warmup_steps=1)  # fmt: skip
        if schedule == "kto":  # unpaired data, with KTO's mismatched pairs over a partition
            raw["data"]["pref"] = {"train": str(label_files[0]), "eval": str(label_files[1])}
            raw["objectives"] = {"pref": {"name": "kto"}}
        raw["output_dir"] = str(tmp_path / f"two-{schedule}")
        raw["cache_dir"] = str(tmp_path / f"cache-{schedule}")
        raw["train"]["log_batches"] = True
        (tmp_path / f"{schedule}.yaml").write_text(yaml.safe_dump(raw))
        raws[schedule] = raw
    output = torchrun([tmp_path / f"{s}.yaml" for s in SCHEDULES], tmp_path)
    assert "2 per process x 2 processes x 1 accumulation = 4 per step" in output
    for schedule, raw in raws.items():
        out2 = Path(raw["output_dir"])
        summary = json.loads((out2 / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["global_batch"] == 4, schedule
        out1 = tmp_path / f"one-{schedule}"
        one = {**raw, "output_dir": str(out1), "cache_dir": str(tmp_path / f"cache1-{schedule}"),
               "train": {**raw["train"], "grad_accum": 2}}  # fmt: skip
        train(parse_config(one), progress=False)
        # the reference pass ran once (one file per entry), split across the processes, and gave
        # the very values of one process: each batch is the same forward on either side (only
        # sequential's switched reference comes from weights that differ by rounding)
        refs1, refs2 = (
            {f.name: load_file(f)["logp"] for f in (Path(c) / "refs").iterdir()}
            for c in (one["cache_dir"], raw["cache_dir"])
        )
        same = set(refs1) & set(refs2)
        assert (
            len(same)
            == len(refs2) - (schedule == "sequential")
            == len(refs1) - (schedule == "sequential")
        ), schedule
        for name in same:
            assert torch.equal(refs1[name], refs2[name]), schedule
        # each rank trained on its own items: the first and the second micro-batch of one process
        ranks = [[json.loads(x) for x in (out2 / "batches" / f"rank{r}.jsonl").open()]
                 for r in (0, 1)]  # fmt: skip
        mine = [json.loads(x) for x in (out1 / "batches" / "rank0.jsonl").open()]
        streams = len(mine) // 8  # 4 steps x 2 micro-batches
        for i, (a, b) in enumerate(zip(*ranks, strict=True)):
            step, k = divmod(i, streams)
            assert a["step"] == b["step"] == step + 1 and a["objective"] == b["objective"]
            assert not set(a["items"]) & set(b["items"]), (schedule, step)
            first, second = mine[2 * streams * step + k], mine[2 * streams * step + streams + k]
            assert (a["items"], b["items"]) == (first["items"], second["items"]), schedule
        t1, t2 = lines(out1, "train"), lines(out2, "train")
        decisions = [(r["step"], r["objective"]) for r in t1]
        assert decisions == [(r["step"], r["objective"]) for r in t2], schedule
        for a, b in zip(t1, t2, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), schedule
            assert b["lr"] == a["lr"], schedule
        # held-out metrics (split across the processes) and each objective's own held-out loss
        for a, b in zip(lines(out1, "eval"), lines(out2, "eval"), strict=True):
            assert set(a) == set(b), schedule
            for key in set(a) - {"elapsed_s", "type"}:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (schedule, key)
        w1, w2 = final_weights(out1), final_weights(out2)
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=0.01 * raw["train"]["lr"],
                                       msg=lambda m, s=schedule, k=k: f"{s} {k}: {m}")  # fmt: skip


SKEWED = """
import json, os, sys
from unitune import schedules, session
from unitune.config import load_config
from unitune.jobs import train

rank = int(os.environ["RANK"])
loss = session.Run.loss


def skewed(self, kind, idx):  # SFT loss 1 lower on rank 0, 1 higher on rank 1: the same mean
    value, n = loss(self, kind, idx)
    return (value + (2.0 * rank - 1.0) if kind == "sft" else value), n


session.Run.loss = skewed
plan, seen = schedules.Maxright.plan, []


def recorded(self, step, probe):
    out = plan(self, step, probe)
    seen.append([step, sorted(out), self.gaps])
    return out


schedules.Maxright.plan = recorded
train(load_config(sys.argv[1]), progress=False)
with open(f"{sys.argv[2]}.{rank}.json", "w") as f:
    json.dump(seen, f)
"""


def test_maxright_decides_alike_on_ranks_whose_losses_differ(tiny_config, tmp_path):
    raw = tiny_config("maxright", max_steps=6, batch_size=2, eval_every=6)
    # optima near the start, so that a rank alone would decide by its own skew: rank 0's SFT
    # gap (1 - lam) * (l - 1 - 10.5) < 0 < its preference gap, rank 1's SFT gap > 0.5
    raw["schedule"] |= {"ideal": "config", "f_sft_star": 10.5, "f_pref_star": 0.3}
    path = tmp_path / "maxright.yaml"
    path.write_text(yaml.safe_dump(raw))
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED)
    env = {**os.environ, "UNITUNE_CACHE": str(tmp_path / "ucache"), "OMP_NUM_THREADS": "1"}
    seen = tmp_path / "seen"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), str(path), str(seen)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"seen.{r}.json").read_text()) for r in (0, 1))
    # every decision and every gap alike on both ranks, although their own SFT losses differ by 2:
    # the gaps are of the losses averaged over the ranks
    assert len(rank0) == 6 and rank0 == rank1
