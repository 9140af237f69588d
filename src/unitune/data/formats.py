"""Read a data source into raw records, each with its 1-based location.

Sources:

- `.jsonl`: one JSON object per line. Records are numbered by their line (blank lines are
  skipped but do not shift the numbers); each line is decoded on its own, so invalid UTF-8 or
  broken JSON is reported for that line.
- `.json`: a list of objects, or an object holding the list under the key `split` or `"data"`.
- `.parquet`: read with pyarrow.
- a directory written by `datasets.save_to_disk` (a `DatasetDict` gives its `split`).
- anything else that is not an existing path: a hub id, read with
  `datasets.load_dataset(source, split=split)`.
- an in-memory list of dicts (or a `datasets.Dataset`), named "<memory>".

Non-JSONL records are numbered by index + 1. `Source.fingerprint` identifies the content for the
tokenized-data cache: the sha256 of a file's bytes, of a saved dataset's files, or a hub dataset's
own `datasets` fingerprint; None for in-memory data (never cached).
Problems with the whole file raise `DataError`;
problems with one record come back as `RawRecord.error` so the loader can skip them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitune.data.errors import DataError, RecordError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class RawRecord:
    number: int  # 1-based line (JSONL) or record index + 1
    value: dict[str, Any] | None
    error: RecordError | None = None
    line: bytes | None = None  # a JSONL line not decoded yet (`open_source(..., lazy=True)`)

    def parsed(self) -> RawRecord:
        """The record with its line decoded: `value`, or `error` for broken UTF-8 or JSON."""
        return self if self.line is None else _parse_line(self.number, self.line)


@dataclass
class Source:
    name: str  # how messages name the source: the path or hub id as given
    unit: str  # "line" or "record"
    records: Iterable[RawRecord]
    # of the content, for the data cache, computed when asked for (hashing reads the file)
    identify: Callable[[], str | None] = lambda: None

    def fingerprint(self) -> str | None:
        """What identifies the content, for the data cache; None: not cacheable."""
        return self.identify()


def open_source(
    source: str | os.PathLike | Iterable[dict], split: str = "train", *, lazy: bool = False
) -> Source:
    """Open `source` for reading; records are read lazily (except `.json`). `lazy`: JSONL lines
    come undecoded (`RawRecord.line`; `parsed()` decodes them), so that the processes that
    tokenize them also parse them."""
    if not isinstance(source, (str, os.PathLike)):
        return Source("<memory>", "record", _from_rows(source))
    name = str(source)
    path = Path(source).expanduser()
    identify = functools.partial(_content_hash, path, split)
    if path.is_dir():
        rows = _load_from_disk(name, path, split)
        return Source(name, "record", _from_rows(rows), identify)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return Source(name, "line", _read_jsonl(name, path, lazy), identify)
        if suffix == ".json":
            rows = _read_json(name, path, split)
            return Source(name, "record", _from_rows(rows), identify)
        if suffix == ".parquet":
            rows = _read_parquet(name, path)
            return Source(name, "record", _from_rows(rows), identify)
        raise DataError(name, None, None, "unsupported file type; use .jsonl, .json or .parquet")
    if path.suffix.lower() in FILE_SUFFIXES or name.startswith((".", "/", "~")):
        raise DataError(name, None, None, "no such file or directory")
    rows = _load_hub(name, split)
    own = getattr(rows, "_fingerprint", None)  # datasets' hash of the cached Arrow data
    key = f"hub:{name}:{split}:{own}" if own else None
    return Source(name, "record", _from_rows(rows), lambda: key)


def _content_hash(path: Path, split: str) -> str:
    """sha256 of a file's bytes, or of every file under a directory (relative names included)."""
    digest = hashlib.sha256(f"split={split}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _from_rows(rows: Iterable[Any]) -> Iterator[RawRecord]:
    for index, row in enumerate(rows):
        yield _as_record(index + 1, row)


def _as_record(number: int, value: Any) -> RawRecord:
    if isinstance(value, dict):
        return RawRecord(number, value)
    problem = f"expected a JSON object, got {type(value).__name__}"
    return RawRecord(number, None, RecordError(None, "wrong_type", problem))


def _read_jsonl(name: str, path: Path, lazy: bool = False) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():  # blank (ASCII whitespace); a BOM-only first line is decoded
                continue
            if lazy:
                yield RawRecord(number, None, line=raw)
            else:
                record = _parse_line(number, raw)
                if record is not None:
                    yield record


def _parse_line(number: int, raw: bytes) -> RawRecord | None:
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        problem = f"invalid UTF-8 (byte {err.start + 1} of the line)"
        return RawRecord(number, None, RecordError(None, "undecodable", problem))
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        problem = f"invalid JSON: {err.msg} (column {err.colno})"
        return RawRecord(number, None, RecordError(None, "invalid_json", problem))
    return _as_record(number, value)


def _read_json(name: str, path: Path, split: str) -> list[Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(name, None, None, f"invalid UTF-8 at line {line}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        detail = f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        raise DataError(name, None, None, detail) from None
    if isinstance(value, dict):
        for key in (split, "data"):
            if isinstance(value.get(key), list):
                return value[key]
        detail = f"expected a list of records, or one under the key '{split}' or 'data'"
        raise DataError(name, None, None, detail)
    if not isinstance(value, list):
        raise DataError(name, None, None, "expected a list of records")
    return value


def _read_parquet(name: str, path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(name, None, None, f"cannot read Parquet: {err}") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _load_from_disk(name: str, path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(name, None, None, f"cannot load a saved dataset: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            detail = f"split '{split}' not found; available: {', '.join(loaded)}"
            raise DataError(name, None, None, detail)
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # any loader failure becomes one clear DataError
        detail = f"not a local file or directory, and loading it as a hub dataset failed: {err}"
        raise DataError(name, None, None, detail) from err
