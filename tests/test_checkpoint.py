"""Checkpoints for exact resume: bitwise round trip, corruption, retention, disk full, kill -9."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import get_scheduler

from unitune.models.config import ModelConfig
from unitune.models.load import load_model
from unitune.training import checkpoint as ck
from unitune.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify,
)

LORA = {"r": 4, "alpha": 8}
SRC = Path(__file__).resolve().parents[1] / "src"


def build(lora=None):
    model, _ = load_model(ModelConfig(name="builtin:tiny", lora=lora))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return model, optimizer, get_scheduler("linear", optimizer, 2, 10)


def train(model, optimizer, scheduler, steps: int, data_rng: torch.Generator) -> list[float]:
    """Batches come from `data_rng`; the global RNG scales each loss, so both RNGs matter."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 2000, (2, 12), generator=data_rng)
        loss = model(input_ids=ids, labels=ids).loss * (1 + 0.1 * torch.rand(()))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained():
    """A builtin:tiny model, optimizer and scheduler after one step (so Adam has state)."""
    objs = build()
    train(*objs, 1, torch.Generator().manual_seed(0))
    return objs


def save(run_dir, step, objs, **kw):
    model, optimizer, scheduler = objs
    return save_checkpoint(
        run_dir,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state={"step": step},
        **kw,
    )


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def step_dir(run_dir, step) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# 1. Round trip


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_resume_is_bitwise_exact(tmp_path, lora):
    torch.manual_seed(0)
    data_rng = torch.Generator().manual_seed(1)
    model, optimizer, scheduler = build(lora)
    train(model, optimizer, scheduler, 3, data_rng)
    path = save_checkpoint(
        tmp_path,
        3,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state={"step": 3, "epoch": 0, "seen": [1, 2, 3]},
        tensors={"torch_rng": torch.get_rng_state(), "data_rng": data_rng.get_state()},
    )
    expected = train(model, optimizer, scheduler, 2, data_rng)  # the uninterrupted run

    torch.manual_seed(999)  # the resumed process starts elsewhere (and LoRA init draws from it)
    model2, optimizer2, scheduler2 = build(lora)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 3 and ckpt.path == path
    state, tensors = load_checkpoint(ckpt, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert state == {"step": 3, "epoch": 0, "seen": [1, 2, 3]}
    torch.set_rng_state(tensors["torch_rng"])
    data_rng2 = torch.Generator()
    data_rng2.set_state(tensors["data_rng"])
    resumed = train(model2, optimizer2, scheduler2, 2, data_rng2)

    assert resumed == expected
    params, params2 = dict(model.named_parameters()), dict(model2.named_parameters())
    assert params.keys() == params2.keys()
    assert all(torch.equal(params[name], params2[name]) for name in params)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again

    weights = "adapter.safetensors" if lora else "model.safetensors"
    files = {weights, "optimizer.safetensors", "optimizer.json", "scheduler.json", "state.json"}
    files |= {"tensors.safetensors", "manifest.json"}
    assert {p.name for p in path.iterdir()} == files
    with safe_open(str(path / weights), "pt") as fh:
        stored = set(fh.keys())
    if lora:
        assert stored and all("lora_" in name for name in stored)
    else:  # tied embeddings are stored once and tied again after loading
        assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
        assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()


def test_load_refuses_a_checkpoint_of_the_other_kind(tmp_path, trained):
    path = save(tmp_path, 1, trained)
    model, optimizer, scheduler = build(LORA)
    with pytest.raises(CheckpointError, match="full model, but the model is a PeftModel"):
        load_checkpoint(
            Checkpoint(path, 1, verify(path)),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
        )


def test_state_that_json_cannot_hold_is_refused_before_writing(tmp_path, trained):
    model, optimizer, scheduler = trained
    with pytest.raises(CheckpointError, match="state.*not JSON-serialisable"):
        save_checkpoint(
            tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, state={"x": {1j}}
        )
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# 2. Corruption and partial writes


def test_corrupt_and_partial_checkpoints_are_skipped(tmp_path, trained):
    for step in (1, 2, 3):
        save(tmp_path, step, trained, keep_last=5)
    model_file = step_dir(tmp_path, 3) / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    (step_dir(tmp_path, 2) / "manifest.json").unlink()  # as if written without the rename
    leftover = tmp_path / "checkpoints" / ".step-00000004.tmp-99999"  # a killed save
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    assert list_checkpoints(tmp_path) == [step_dir(tmp_path, s) for s in (1, 2, 3)]
    logs: list[str] = []
    ckpt = latest_checkpoint(tmp_path, log=logs.append)
    assert ckpt is not None and ckpt.step == 1 and ckpt.path == step_dir(tmp_path, 1)
    assert len(logs) == 2 and all("\n" not in line for line in logs)
    assert "step-00000003" in logs[0] and "model.safetensors" in logs[0] and "sha256" in logs[0]
    assert "step-00000002" in logs[1] and "no manifest.json" in logs[1]

    model, optimizer, scheduler = trained
    with pytest.raises(CheckpointError, match="step-00000003: model.safetensors .*sha256"):
        load_checkpoint(
            Checkpoint(step_dir(tmp_path, 3), 3, {}),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    save(tmp_path, 4, trained, keep_last=5)  # a successful save removes the leftover
    assert not leftover.exists()
    assert latest_checkpoint(tmp_path).step == 4


def test_verify_names_what_is_wrong(tmp_path, trained):
    for step in (1, 2, 3):
        save(tmp_path, step, trained, keep_last=5)
    (step_dir(tmp_path, 1) / "tensors.safetensors").unlink()
    with open(step_dir(tmp_path, 2) / "optimizer.safetensors", "r+b") as fh:
        fh.truncate(100)
    (step_dir(tmp_path, 3) / "manifest.json").write_text('{"version": 1, "step": 3, "fil')
    with pytest.raises(CheckpointError, match=r"step-00000001: tensors.safetensors is missing"):
        verify(step_dir(tmp_path, 1))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is 100 bytes"):
        verify(step_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match=r"step-00000003: manifest.json is not valid JSON"):
        verify(step_dir(tmp_path, 3))
    assert latest_checkpoint(tmp_path, log=lambda _: None) is None


# --------------------------------------------------------------------------------------------
# 3. Retention


def test_keep_last_and_pinned_steps(tmp_path, trained):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, trained, keep_last=2)
    assert names(tmp_path) == ["step-00000003", "step-00000004"]
    save(tmp_path, 5, trained, keep_last=2, keep={3})
    save(tmp_path, 6, trained, keep_last=2, keep={3})
    assert names(tmp_path) == ["step-00000003", "step-00000005", "step-00000006"]
    save(tmp_path, 7, trained, keep_last=1)
    assert names(tmp_path) == ["step-00000007"]
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 8, trained, keep_last=0)


# --------------------------------------------------------------------------------------------
# 4. Disk full


def enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, trained, monkeypatch):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    real_write = ck._write_file

    def write_until_full(path, chunks):
        if path.name != "optimizer.safetensors":
            return real_write(path, chunks)
        with open(path, "xb") as fh:
            fh.write(next(iter(chunks)))  # part of the file, then the disk is full
        raise enospc()

    monkeypatch.setattr(ck, "_write_file", write_until_full)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 3, trained)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint step 3 to {tmp_path / 'checkpoints'}")
    assert message.endswith("No space left on device; previous checkpoint step 2 is intact")
    assert names(tmp_path) == ["step-00000001", "step-00000002"]  # no temp dir left
    assert verify(step_dir(tmp_path, 2))["step"] == 2
    assert latest_checkpoint(tmp_path).step == 2


def test_failed_rename_keeps_the_checkpoint_it_would_replace(tmp_path, trained, monkeypatch):
    save(tmp_path, 1, trained)
    before = verify(step_dir(tmp_path, 1))
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(CheckpointError, match="step 1 .*previous checkpoint step 1 is intact"):
        save(tmp_path, 1, trained)  # re-saving a step swaps directories
    with pytest.raises(CheckpointError, match="step 2 .*previous checkpoint step 1 is intact"):
        save(tmp_path, 2, trained)
    assert names(tmp_path) == ["step-00000001"]
    assert verify(step_dir(tmp_path, 1)) == before


# --------------------------------------------------------------------------------------------
# 5. kill -9


CHILD = """
import sys, time
from pathlib import Path
import torch
from unitune.training import checkpoint

model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
model(torch.randn(2, 256)).sum().backward()
optimizer.step()
real_write = checkpoint._write_safetensors

def write_then_hang(path, tensors, metadata=None):
    info = real_write(path, tensors, metadata)
    if path.name == "model.safetensors":
        print("MODEL-WRITTEN", flush=True)
        time.sleep(60)
    return info

checkpoint._write_safetensors = write_then_hang
checkpoint.save_checkpoint(
    Path(sys.argv[1]), int(sys.argv[2]), model=model, optimizer=optimizer,
    scheduler=scheduler, state={},
)
print("SAVED", flush=True)
"""


def test_kill_during_a_save_leaves_previous_checkpoints_intact(tmp_path, trained):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    before = verify(step_dir(tmp_path, 2))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), "2"],  # re-saves step 2
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    guard = threading.Timer(60, child.kill)
    guard.start()
    try:
        assert child.stdout.readline().strip() == "MODEL-WRITTEN"
        leftover = tmp_path / "checkpoints" / f".step-00000002.tmp-{child.pid}"
        assert (leftover / "model.safetensors").is_file()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        guard.cancel()
        child.kill()
        child.stdout.close()

    assert list_checkpoints(tmp_path) == [step_dir(tmp_path, 1), step_dir(tmp_path, 2)]
    ckpt = latest_checkpoint(tmp_path, log=pytest.fail)
    assert ckpt.step == 2 and ckpt.manifest == before
    assert verify(step_dir(tmp_path, 1))["step"] == 1
    save(tmp_path, 3, trained)
    assert names(tmp_path) == ["step-00000002", "step-00000003"]


def test_a_save_killed_between_its_renames_is_repaired(tmp_path, trained):
    save(tmp_path, 1, trained)
    save(tmp_path, 2, trained)
    manifest = verify(step_dir(tmp_path, 2))
    moved_aside = tmp_path / "checkpoints" / ".step-00000002.old-99999"
    os.replace(step_dir(tmp_path, 2), moved_aside)  # step 2 was being re-saved
    assert latest_checkpoint(tmp_path).step == 1
    save(tmp_path, 3, trained, keep_last=5)
    assert names(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]
    assert verify(step_dir(tmp_path, 2)) == manifest
    assert json.loads((step_dir(tmp_path, 3) / "state.json").read_text()) == {"step": 3}


def test_load_into_live_objects_keeps_their_devices_and_dtypes(tmp_path, trained):
    model, optimizer, scheduler = trained
    before = {name: t.clone() for name, t in optimizer.state_dict()["state"][0].items()}
    path = save(tmp_path, 1, trained)
    state, tensors = load_checkpoint(
        latest_checkpoint(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler
    )
    assert path == step_dir(tmp_path, 1) and state == {"step": 1} and tensors == {}
    after = optimizer.state_dict()["state"][0]
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype
        assert after[name].device == tensor.device
