"""Files on disk: atomic writes with one fsync policy, safetensors streamed one tensor at a time,
and where unitune keeps its cache.

The fsync policy, everywhere: a file is written, flushed and fsynced before it is renamed into
place, and the directory holding the new name is fsynced after the rename, so after a crash a
path holds either its previous content or its new content, never a part of it.

- `atomic_write(path, data)`: a file, through a temporary sibling and `os.replace`.
- `atomic_dir(path)`: a directory, written into a temporary sibling and renamed into place when
  the block succeeds (every file and directory in it fsynced first).
- `write_file(path, chunks)`: a new file inside a directory that is itself being written
  atomically (a checkpoint's, say): written, fsynced, its size and sha256 returned.
- `safetensors_chunks(entries, tensor)`: the bytes of a safetensors file whose header is known
  up front, each tensor computed only when its turn comes (`ST_DTYPES` names the dtypes).
- `cache_dir(configured)`: `cache_dir` from the config, else `$UNITUNE_CACHE`, else
  `~/.cache/unitune`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Durability


def file_sha256(path: str | os.PathLike, digest: Any = None) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (fed into `digest` when given, whose
    hex digest is returned)."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (new files, renames) durable (POSIX; skipped on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: str | os.PathLike, chunks: Iterable[Any], *, digest: bool = True
) -> dict[str, Any]:
    """Write `chunks` (bytes-like) to the new file `path` (an existing one is an error) and
    fsync it; return `{"bytes": size, "sha256": hex}` (`sha256` None without `digest`)."""
    hasher = hashlib.sha256() if digest else None
    size = 0
    with open(path, "xb") as fh:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            fh.write(view)
            if hasher is not None:
                hasher.update(view)
            size += len(view)
        fh.flush()
        os.fsync(fh.fileno())
    return {"bytes": size, "sha256": hasher.hexdigest() if hasher is not None else None}


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically: a temporary sibling is written and
    fsynced, renamed over `path`, and the directory fsynced. On any failure `path` keeps its
    previous content and the temporary file is removed. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600: give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir` to write into; move it into place only when
    the block succeeds (each file and directory in it fsynced first, the parent after). An
    existing `out_dir` is renamed away, replaced, then deleted; on any error the temporary
    directory is removed and a previous `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    old: Path | None = None
    try:
        yield tmp
        fsync_tree(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / "dir", out_dir)  # put the previous one back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, and `root` itself."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir() and not path.is_symlink():
            fsync_dir(path)
    fsync_dir(root)


def make_temp_dir(target: Path) -> Path:
    """A fresh directory next to `target` (same filesystem, so a rename can move it in place).

    mkdtemp makes it private (0700); the final directory gets the usual permissions instead.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --------------------------------------------------------------------------------------------
# The cache directory


def cache_root() -> Path:
    """Where unitune keeps derived files: `$UNITUNE_CACHE`, else `~/.cache/unitune`."""
    env = os.environ.get("UNITUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unitune"


def cache_dir(configured: str | os.PathLike | None) -> Path:
    """The config's `cache_dir` when it is set, else `cache_root()`."""
    return Path(configured).expanduser() if configured else cache_root()


# --------------------------------------------------------------------------------------------
# safetensors, one tensor at a time

# safetensors' dtype names
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype].itemsize


def safetensors_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header: u64 length, then JSON padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def safetensors_chunks(
    entries: list[TensorEntry],
    tensor: Callable[[TensorEntry], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Iterator[Any]:
    """The bytes of a safetensors file (for `write_file`): the header from `entries`, then each
    tensor as `tensor(entry)` computes it, one at a time; each must match its entry's dtype and
    shape (a RuntimeError otherwise). A ValueError on a big-endian machine."""
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; this machine is not")
    yield safetensors_header(entries, metadata)
    for e in entries:
        t = tensor(e)
        if ST_NAMES.get(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"{e.name}: computed {t.dtype} {list(t.shape)}, expected {e}")
        data = t.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            yield data.view(torch.uint8).numpy()
