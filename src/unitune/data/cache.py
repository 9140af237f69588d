"""The tokenized-data cache: a source tokenized once, read back memory-mapped by every later run.

An entry is a directory `<cache_dir>/data/<key>/` holding the `TokenStore` arrays and the items'
store indices as raw little-endian files, and `meta.json` (the item kind, the array lengths and
the `DataReport` of the load that built it). The key is the sha256 of everything the result
depends on: the source's content (`Source.fingerprint`), the tokenizer (its full definition and
chat template), what is loaded and how (`options`: kind, format, columns, split, max_length,
on_bad_record, score handling), and the versions of this layout, `tokenizers` and
`transformers`. A rerun, or every run of a sweep, finds the entry and tokenizes nothing.

Entries are written into a temporary directory and renamed into place, so a crash or a full disk
never leaves a partial entry under a key; an entry whose files do not have the lengths its
`meta.json` states is ignored (and rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from unitune.core.io import fsync_dir, write_file
from unitune.data.errors import DataReport
from unitune.data.store import Items, TokenStore

log = logging.getLogger(__name__)

LAYOUT = 2  # bump when what an entry holds, or how records are tokenized, changes
ARRAYS = {  # file name -> (TokenStore field or "items"/"target", dtype)
    "ids.i32": ("ids", "<i4"),
    "mask.u8": ("mask", "u1"),
    "offsets.i64": ("offsets", "<i8"),
    "truncated.b": ("truncated", "?"),
    "first_target.i32": ("first_target", "<i4"),
    "items.i64": ("items", "<i8"),
    "target.f64": ("target", "<f8"),
}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's output: its full definition (the fast tokenizer's
    JSON, else its vocabulary), chat template, special tokens and class."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos_id": tokenizer.eos_token_id,
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(source_fp: str, tokenizer_fp: str, options: dict[str, Any]) -> str:
    parts = {
        "layout": LAYOUT,
        "source": source_fp,
        "tokenizer": tokenizer_fp,
        "options": options,
        "versions": {name: _version(name) for name in ("tokenizers", "transformers")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / "data" / key


def read(
    cache_dir: str | os.PathLike, key: str, *, quiet: bool = False
) -> tuple[Items, DataReport] | None:
    """The cached items and report under `key` (arrays memory-mapped), or None. Entries are
    never changed in place (a new one is renamed over a damaged one), so a mapped entry stays
    valid for as long as it is used."""
    path = entry_dir(cache_dir, key)
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {}
        for name, (field, dtype) in ARRAYS.items():
            n = meta["lengths"].get(name)
            if n is None:
                continue
            if (path / name).stat().st_size != n * np.dtype(dtype).itemsize:
                raise ValueError(f"{name} does not have {n} entries")
            arrays[field] = (
                np.memmap(path / name, dtype=dtype, mode="r", shape=(n,))
                if n
                else np.zeros(0, dtype=dtype)
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not quiet:
            log.warning(
                "ignoring the damaged data cache entry %s (%s); tokenizing again", path, err
            )
        return None
    store = TokenStore(**{f: arrays[f] for f in TokenStore.__dataclass_fields__})
    items = Items(store, meta["kind"], arrays["items"], arrays.get("target"), meta["feedback_kind"])
    return items, DataReport(**meta["report"])


def write(cache_dir: str | os.PathLike, key: str, items: Items, report: DataReport) -> Path | None:
    """Store `items` (their whole store) and `report` under `key`, atomically. A failure (e.g. a
    full disk) is logged and leaves no entry: the run goes on with what it tokenized."""
    final = entry_dir(cache_dir, key)
    arrays = {f: getattr(items.store, f) for f in TokenStore.__dataclass_fields__}
    arrays["items"] = items.seqs.reshape(-1)
    if items.target is not None:
        arrays["target"] = items.target
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=final.parent))
        lengths = {}
        for name, (field, dtype) in ARRAYS.items():
            if field in arrays:
                data = np.ascontiguousarray(arrays[field], dtype=dtype)
                write_file(tmp / name, [data], digest=False)  # no copy of the array
                lengths[name] = len(data)
        meta = {
            "layout": LAYOUT,
            "kind": items.kind,
            "feedback_kind": items.feedback_kind,
            "lengths": lengths,
            "report": asdict(report),
        }
        write_file(tmp / "meta.json", [json.dumps(meta, indent=1).encode()], digest=False)
        fsync_dir(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # an entry is there: another process's (keep it) or a damaged one
            if read(cache_dir, key, quiet=True) is not None:
                return final
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        tmp = None
        fsync_dir(final.parent)
        return final
    except OSError as err:
        log.warning("could not write the data cache entry %s: %s", final, err)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
