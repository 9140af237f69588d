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
from conftest import ANIMALS, TIMING, final_weights, write_jsonl
from safetensors.torch import load_file

from unitune.config import parse_config
from unitune.jobs import train
from unitune.training.batches import BatchStream


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
# the runs of several configs in one launch (imports and start-up paid once);
# "CONFIG@CHECKPOINT" resumes that config's run from that checkpoint
MANY = """
import sys
from unitune.config import load_config
from unitune.jobs import train
for arg in sys.argv[1:]:
    path, _, ckpt = arg.partition("@")
    train(load_config(path), progress=False, resume=ckpt or False)
"""
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def torchrun(configs: list, tmp_path: Path, nproc: int = 2, accelerate: str | None = None) -> str:
    """The configs run in one launch of `nproc` processes: torchrun (DDP), or `accelerate launch`
    with `examples/accelerate/<accelerate>.yaml`, as a user launches it."""
    env = {**os.environ, "UNITUNE_CACHE": str(tmp_path / "ucache"), "COLUMNS": "250",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = tmp_path / "many.py"
    script.write_text(MANY)
    if accelerate is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(EXAMPLES / f"{accelerate}.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(free_port())]  # fmt: skip
    cmd += [str(script), *map(str, configs)]
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


SCHEDULES = ["sft", "pref", "sequential", "mix", "alright", "maxright", "kto", "parallel", "lora"]


def variant(name: str, tiny_config, tmp_path: Path, label_files=None) -> dict:
    """A 4-step run on 2 processes: a schedule, or KTO (unpaired data, its mismatched pairs over a
    partition), IFT (its own two forwards), LoRA (reference = the adapters disabled)."""
    schedule = {"kto": "alright", "ift": "sft", "lora": "pref"}.get(name, name)
    # a warm-up and a decaying LR: each step moves the schedule once, whatever the processes
    raw = tiny_config(schedule, max_steps=4, batch_size=2, eval_every=2, lr_schedule="linear",
                      warmup_steps=1)  # fmt: skip
    if name == "kto":
        raw["data"]["pref"] = {"train": str(label_files[0]), "eval": str(label_files[1])}
        raw["objectives"] = {"pref": {"name": "kto"}}
    if name == "ift":
        raw["objectives"] = {"sft": {"name": "ift"}}
    if name == "lora":
        raw["model"] = {"name": "builtin:tiny", "lora": {"r": 4, "target_modules": ["q_proj"]}}
    raw["output_dir"] = str(tmp_path / f"two-{name}")
    raw["cache_dir"] = str(tmp_path / f"cache-{name}")
    raw["train"]["log_batches"] = True
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return raw


def cut_run(raw: dict, tmp_path: Path) -> list[str]:
    """`raw` again, checkpointed every 2 steps, then resumed from step 2 (as after a crash):
    the launch arguments."""
    cut = {**raw, "output_dir": str(tmp_path / "cut")}
    cut["train"] = {**cut["train"], "save_every": 2}
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(cut))
    step2 = tmp_path / "cut" / "checkpoints" / "step-00000002"
    return [str(tmp_path / "cut.yaml"), f"{tmp_path / 'cut.yaml'}@{step2}"]


def assert_resumed_exactly(raw: dict, tmp_path: Path, output: str) -> dict:
    """The resumed run ended bit for bit where the uninterrupted one did; returns the step-2
    checkpoint's manifest."""
    assert "resumed from" in output
    uncut, cut = Path(raw["output_dir"]), tmp_path / "cut"
    w, w_cut = final_weights(uncut), final_weights(cut)
    assert w.keys() == w_cut.keys()
    for k in w:
        assert torch.equal(w_cut[k], w[k]), k
    assert [r["loss"] for r in lines(cut, "train")] == [r["loss"] for r in lines(uncut, "train")]
    return json.loads((cut / "checkpoints" / "step-00000002" / "manifest.json").read_text())


def test_two_processes_equal_one_process_with_accumulation(tiny_config, tmp_path, label_files):
    """For every schedule, KTO, PAFT and LoRA: 2 processes x batch b against 1 process x batch b
    x grad_accum 2 over the same batches; and a 2-process run resumed from a checkpoint.
    DDP averages the ranks' gradients by an all-reduce where one process sums scaled micro-batch
    gradients: the same sum in another order, so values agree to float32 rounding, compounded
    over a few Adam steps (rtol 1e-4), and the schedule's decisions agree exactly. Adam scales each
    update to about `lr` whatever the gradient's size, so the rounding of a near-zero gradient
    entry can move that weight by a fraction of `lr`: weights agree to 1 % of one step."""
    raws = {name: variant(name, tiny_config, tmp_path, label_files) for name in SCHEDULES}
    # through the shipped launch file, as a user starts it on CPU
    args = [tmp_path / f"{s}.yaml" for s in SCHEDULES] + cut_run(raws["alright"], tmp_path)
    output = torchrun(args, tmp_path, accelerate="ddp-cpu")
    assert "DDP, 2 processes; batch: 2 per process x 2 processes x 1 accumulation = 4" in output
    manifest = assert_resumed_exactly(raws["alright"], tmp_path, output)
    assert "model.safetensors" in manifest["files"]  # DDP: the one-process checkpoint format
    for schedule, raw in raws.items():
        assert_like_one_process(schedule, raw, tmp_path)


def assert_like_one_process(name: str, raw: dict, tmp_path: Path) -> None:
    """The 2-process run of `raw` against 1 process x grad_accum 2 over the same batches."""
    schedule = "parallel" if raw.get("job") == "parallel" else raw["schedule"]["name"]
    out2 = Path(raw["output_dir"])
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4, name
    out1 = tmp_path / f"one-{name}"
    one = {**raw, "output_dir": str(out1), "cache_dir": str(tmp_path / f"cache1-{name}"),
           "train": {**raw["train"], "grad_accum": 2}}  # fmt: skip
    train(parse_config(one), progress=False)
    # the reference pass ran once (one file per entry), split across the processes, and gave
    # the very values of one process: each batch is the same forward on either side (only
    # sequential's switched reference comes from weights that may differ by rounding: with one
    # thread per process they come out bitwise equal, with several they need not)
    refs1, refs2 = (
        {f.name: load_file(f)["logp"] for f in (Path(c) / "refs").iterdir()}
        for c in (one["cache_dir"], raw["cache_dir"])
    )
    switched = schedule == "sequential"
    same = set(refs1) & set(refs2)
    assert len(refs1) == len(refs2), name
    assert len(same) in {len(refs2), len(refs2) - switched}, name
    for entry in same:
        assert torch.equal(refs1[entry], refs2[entry]), name
    # PAFT: each branch is a run on both processes; the merge, on the main one, merges those
    for run in ["sft", "pref"] if schedule == "parallel" else [""]:
        assert_same_steps(name, out1 / run, out2 / run, raw["train"]["max_steps"])
    # held-out metrics (split across the processes) and each objective's own held-out loss
    for a, b in zip(lines(out1, "eval"), lines(out2, "eval"), strict=True):
        assert set(a) == set(b), name
        for key in set(a) - {*TIMING, "type"}:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, key)
    w1, w2 = final_weights(out1), final_weights(out2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=0.01 * raw["train"]["lr"],
                                   msg=lambda m, s=name, k=k: f"{s} {k}: {m}")  # fmt: skip


def assert_same_steps(name: str, out1: Path, out2: Path, max_steps: int) -> None:
    """Each rank trained on its own items, the first and the second micro-batch of one process;
    the same decisions, losses and learning rates."""
    ranks = [[json.loads(x) for x in (out2 / "batches" / f"rank{r}.jsonl").open()]
             for r in (0, 1)]  # fmt: skip
    mine = [json.loads(x) for x in (out1 / "batches" / "rank0.jsonl").open()]
    streams = len(mine) // (2 * max_steps)
    for i, (a, b) in enumerate(zip(*ranks, strict=True)):
        step, k = divmod(i, streams)
        assert a["step"] == b["step"] == step + 1 and a["objective"] == b["objective"]
        assert not set(a["items"]) & set(b["items"]), (name, step)
        first, second = mine[2 * streams * step + k], mine[2 * streams * step + streams + k]
        assert (a["items"], b["items"]) == (first["items"], second["items"]), name
    t1, t2 = lines(out1, "train"), lines(out2, "train")
    decisions = [(r["step"], r["objective"]) for r in t1]
    assert decisions == [(r["step"], r["objective"]) for r in t2], name
    for a, b in zip(t1, t2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), name
        assert b["lr"] == a["lr"], name


# the runs under each ZeRO stage: ZeRO-3 also with IFT's two forwards before one backward, with
# sequential's switched reference (its fingerprint taken from the gathered weights) and LoRA
ZERO = {"zero2": ["pref"], "zero3": ["pref", "sequential", "ift", "lora"]}


@pytest.mark.parametrize("engine", ZERO)
def test_deepspeed_zero_is_one_process_and_resumes_exactly(engine, tiny_config, tmp_path):
    """`accelerate launch --config_file examples/accelerate/zero{2,3}.yaml` on CPU (DeepSpeed's
    CPU accelerator, gloo): the same run as one process with accumulation (as for DDP), and a
    run checkpointed at step 2 (`save_state`: each rank's optimizer shard) and resumed in the same
    launch ends bit for bit where the uninterrupted one does."""
    pytest.importorskip("deepspeed", reason="pyproject installs DeepSpeed on Linux only")
    raws = {name: variant(name, tiny_config, tmp_path) for name in ZERO[engine]}
    args = [tmp_path / f"{s}.yaml" for s in ZERO[engine]] + cut_run(raws["pref"], tmp_path)
    output = torchrun(args, tmp_path, accelerate=engine)
    assert f"DeepSpeed ZeRO-{engine[-1]}, 2 processes; batch: 2 per process" in output
    # the step-2 checkpoint holds each rank's optimizer shard, listed in the manifest
    manifest = assert_resumed_exactly(raws["pref"], tmp_path, output)
    shards = [f for f in manifest["files"] if f.startswith("engine/") and "optim_states" in f]
    assert len(shards) == 2, manifest["files"]
    for name, raw in raws.items():
        assert_like_one_process(f"{engine}-{name}", raw, tmp_path)


SKEWED = """
import json, os, sys
from unitune.schedules import maxright as schedules
from unitune.training import policy
from unitune.config import load_config
from unitune.jobs import train

rank = int(os.environ["RANK"])
loss = policy.Policy.loss


def skewed(self, kind, idx):  # SFT loss 1 lower on rank 0, 1 higher on rank 1: the same mean
    out = loss(self, kind, idx)
    value = out.value + (2.0 * rank - 1.0) if kind == "sft" else out.value
    return policy.Loss(value, out.tokens, out.figures)


policy.Policy.loss = skewed
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
