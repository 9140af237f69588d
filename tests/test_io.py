"""core/io.py: atomic files and directories keep the previous content when a write fails, fsync
what they write, and stream safetensors byte for byte as the safetensors library writes them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from unitune.core import io
from unitune.core.io import (
    ST_NAMES,
    TensorEntry,
    atomic_dir,
    atomic_write,
    cache_dir,
    safetensors_chunks,
    write_file,
)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(io.os, "fsync", record)
    return calls


def test_atomic_write_replaces_and_fsyncs_the_file_and_its_directory(tmp_path, fsyncs):
    path = tmp_path / "sub" / "a.json"
    atomic_write(path, "one")
    assert path.read_text() == "one"
    assert len(fsyncs) == 2  # the file, then the directory
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("where", ["write", "replace"])
def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(io.os, "replace", broken)
    else:
        monkeypatch.setattr(io.os, "fsync", broken)  # after part of the data is written
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path, fsyncs):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b").write_text("2")
        assert not out.exists()
    assert (out / "a").read_text() == "1" and (out / "nested" / "b").read_text() == "2"
    assert len(fsyncs) >= 5  # two files, two directories, the parent
    with pytest.raises(RuntimeError, match="half-way"), atomic_dir(out) as tmp:
        (tmp / "a").write_text("changed")
        raise RuntimeError("half-way")
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]  # replaced, not merged into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_file_refuses_an_existing_file_and_reports_size_and_sha256(tmp_path, fsyncs):
    info = write_file(tmp_path / "f", [b"ab", bytearray(b"c")])
    assert info == {
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    assert len(fsyncs) == 1
    with pytest.raises(FileExistsError):
        write_file(tmp_path / "f", [b"x"])


def test_safetensors_chunks_are_what_the_library_writes(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5, dtype=torch.float64).to(torch.bfloat16),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 2),
        "mask": torch.tensor([True, False]),
    }
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    raw = ref.read_bytes()
    order = [k for k in json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]) if k in tensors]
    entries = [TensorEntry(k, ST_NAMES[tensors[k].dtype], tuple(tensors[k].shape)) for k in order]
    ours = tmp_path / "ours.safetensors"
    write_file(ours, safetensors_chunks(entries, lambda e: tensors[e.name]))
    assert ours.read_bytes() == raw  # the library's tensor order, header and padding
    back = load_file(str(ours))
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    wrong = [TensorEntry("w", "F16", (3, 4))]
    with pytest.raises(RuntimeError, match="expected"):
        write_file(tmp_path / "bad", safetensors_chunks(wrong, lambda e: tensors[e.name]))


def test_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir(None) == tmp_path / "c"
    assert cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv("UNITUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir(None) == tmp_path / ".cache" / "unitune"
