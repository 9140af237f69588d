"""Load a dataset into `Sequence`s (SFT), `Pair`s (preference pairs) or `Feedback` (unpaired).

Every record is read, validated and tokenized before anything is returned, as `Items` over
compact token arrays (`unitune.data.store`). Records go in chunks: each chunk's records are
validated and their chat templates rendered, then all their texts are encoded in one batched call
of the fast tokenizer; with `num_proc > 1` the chunks are tokenized on that many processes, a few
ahead, and merged in order (bad records are reported in record order as without them). With a
`cache_dir`, the result is kept in the tokenized-data cache (`unitune.data.cache`) under a key of
the source's content, the tokenizer and every option, and a later load with the same key reads
it back memory-mapped instead of tokenizing. With
`on_bad_record="error"` the first bad record raises a `DataError` naming the file, the 1-based
line (JSONL) or record, and the field; with `"skip"` bad records are counted in
`DataReport.skipped` by reason and loading goes on. Problems with the tokenizer or its chat
template are raised in both modes. A dataset with no usable record is an error. Columns the
format does not read are counted per kept record in `DataReport.unused_columns`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from unitune.data import cache
from unitune.data.cache import cache_key, tokenizer_fingerprint
from unitune.data.errors import DataError, DataReport, RecordError
from unitune.data.formats import RawRecord, open_source
from unitune.data.sequences import Sequence
from unitune.data.store import Items, StoreBuilder
from unitune.data.tokenize import Encoder, assemble, plan_example
from unitune.data.validation import (
    Example,
    Format,
    detect_format,
    detect_pref_kind,
    unused_fields,
    validate_feedback,
    validate_preference,
    validate_sft,
)

log = logging.getLogger(__name__)

SourceLike = str | os.PathLike | Iterable[dict]
MAX_LOGGED_SKIPS = 5
CHUNK_RECORDS = 512  # records tokenized together (one batched encode call)


def load_sft(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad_record: str = "error",
    split: str = "train",
    columns: dict[str, str] | None = None,
    format: str = "auto",
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Items, DataReport]:
    """Load SFT data (prompt/completion or messages) as tokenized `Sequence`s.

    `columns` maps standard field names to the source's, e.g. `{"prompt": "instruction"}`.
    `format="alpaca"` reads `instruction`, `input` and `output` (see `validation`); "auto"
    detects the format from the first record's keys. `num_proc`: tokenizing processes;
    `cache_dir`: where the tokenized-data cache lives (None: no cache).
    """
    return _load(
        source, tokenizer, "demonstrations", max_length, on_bad_record, split, columns, format,
        num_proc=num_proc, cache_dir=cache_dir,
    )  # fmt: skip


def load_preference(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad_record: str = "error",
    split: str = "train",
    columns: dict[str, str] | None = None,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    format: str = "auto",
) -> tuple[Items, DataReport]:
    """Load preference data (explicit or implicit prompt, or a named pairs format) as tokenized
    `Pair`s."""
    return _load(
        source, tokenizer, "pairs", max_length, on_bad_record, split, columns, format,
        num_proc=num_proc, cache_dir=cache_dir,
    )  # fmt: skip


def load_feedback(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad_record: str = "error",
    split: str = "train",
    columns: dict[str, str] | None = None,
    score_range: tuple[float, float] | None = None,
    label_threshold: float | None = None,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Items, DataReport]:
    """Load unpaired feedback (prompt, completion and a label or a score) as `Feedback`.

    Prompt/completion are tokenized as SFT prompt/completion. Labels give targets 1.0 / 0.0;
    scores are mapped to [0, 1] from `score_range = (lo, hi)`, which score data requires (an
    error on its first record, raised even with `on_bad_record="skip"`) and label data ignores.
    A malformed `score_range` (not two finite numbers with lo < hi) is an error either way.

    With `label_threshold = T` (in (0, 1]) score data becomes label data: a mapped score `>= T`
    is desirable (target 1.0), a lower one undesirable (0.0), and the items' kind is "label".
    Label data ignores it.
    """
    if score_range is not None:
        score_range = _check_score_range(score_range)
    if label_threshold is not None and not 0.0 < label_threshold <= 1.0:
        raise ValueError(
            "label_threshold (data.pref.label_threshold) must be in (0, 1], a mapped score; "
            f"got {label_threshold!r}"
        )
    return _load(
        source, tokenizer, "unpaired", max_length, on_bad_record, split, columns,
        score_range=score_range, label_threshold=label_threshold,
        num_proc=num_proc, cache_dir=cache_dir,
    )  # fmt: skip


def detect_kind(
    source: SourceLike, split: str = "train", columns: dict[str, str] | None = None
) -> Literal["pairs", "unpaired"]:
    """Whether a preference-slot source holds "pairs" or "unpaired" feedback (first valid record).

    Records that cannot be read (broken JSON, not an object...) are passed over here; the loader
    reports them. A first readable record with neither 'chosen'/'rejected' nor 'label'/'score'
    (or with both) is a `DataError` at that record. An in-memory source should be a list (an
    iterator would be consumed by the peek).
    """
    return _peek(source, split, columns, detect_pref_kind)  # type: ignore[return-value]


def detect_feedback_kind(
    source: SourceLike, split: str = "train", columns: dict[str, str] | None = None
) -> Literal["label", "score"]:
    """Whether an unpaired feedback source holds labels or scores, by its first valid record's
    keys (records are passed over as in `detect_kind`)."""

    def kind(record: dict[str, Any]) -> str:
        return detect_format(record, "unpaired").name

    return _peek(source, split, columns, kind)  # type: ignore[return-value]


def _peek(
    source: SourceLike,
    split: str,
    columns: dict[str, str] | None,
    decide: Callable[[dict[str, Any]], str],
) -> str:
    """`decide(first readable record)`; a `RecordError` is located at that record."""
    src = open_source(source, split)
    first_error: DataError | None = None
    for raw in src.records:
        if raw.error is not None:
            first_error = first_error or raw.error.located(src.name, raw.number, src.unit)
            continue
        record = _rename(raw.value, columns) if columns else raw.value
        try:
            return decide(record)
        except RecordError as err:
            raise err.located(src.name, raw.number, src.unit) from None
    if first_error is not None:
        raise first_error
    raise DataError(src.name, None, None, "no records")


def _check_score_range(score_range: Any) -> tuple[float, float]:
    def number(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    try:
        lo, hi = score_range
    except (TypeError, ValueError):
        lo = hi = None
    if not (number(lo) and number(hi) and lo < hi):
        raise ValueError(
            "score_range (data.pref.score_range) must be [min, max], two finite numbers with "
            f"min < max; got {score_range!r}"
        )
    return float(lo), float(hi)


@dataclass(frozen=True)
class _Job:
    """What tokenizing a record needs; sent once to each tokenizing process."""

    kind: str  # "demonstrations", "pairs" or "unpaired"
    fmt: Format
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    columns: dict[str, str] | None
    score_range: tuple[float, float] | None = None
    label_threshold: float | None = None

    def examples(self, record: dict[str, Any]) -> tuple[list[Example], float | None]:
        """The record's examples (a pair's chosen and rejected) and its feedback target."""
        if self.kind == "demonstrations":
            return [validate_sft(record, self.fmt)], None
        if self.kind == "pairs":
            return list(validate_preference(record, self.fmt)), None
        example, target = validate_feedback(record, self.fmt, self.score_range)
        if self.fmt.name == "score" and self.label_threshold is not None:
            target = 1.0 if target >= self.label_threshold else 0.0
        return [example], target

    def check(self, seqs: list[Sequence]) -> None:
        if self.kind == "pairs" and seqs[0].input_ids == seqs[1].input_ids:
            after = "tokenization and truncation" if seqs[0].truncated else "tokenization"
            raise RecordError("chosen", "identical", f"identical to 'rejected' after {after}")


@dataclass
class _Chunk:
    """The tokenized records of one chunk: kept items' sequences (in order; two per pair) and
    targets, and each bad record's error by its number."""

    store: StoreBuilder = field(default_factory=StoreBuilder)
    targets: list[float] = field(default_factory=list)
    errors: list[tuple[int, RecordError]] = field(default_factory=list)
    truncated: int = 0
    unused: dict[str, int] = field(default_factory=dict)
    blank: int = 0  # lines that decoded to whitespace only: not records


def _tokenize_chunk(job: _Job, encoder: Encoder, records: list[RawRecord]) -> _Chunk:
    """Validate and plan every record, encode all their texts in one batched call, assemble."""
    out = _Chunk()
    planned = []
    for raw in records:
        raw = raw.parsed()
        if raw is None:  # a line of only (Unicode) whitespace: not a record
            out.blank += 1
            continue
        try:
            if raw.error is not None:
                raise raw.error
            record = _rename(raw.value, job.columns) if job.columns else raw.value
            examples, target = job.examples(record)
            planned.append(
                (raw.number, record, [plan_example(e, encoder) for e in examples], target)
            )
        except RecordError as err:
            out.errors.append((raw.number, err))
    encoded = iter(
        encoder.encode_many([t for p in planned for plan in p[2] for t, _ in plan.pieces])
    )
    for number, record, plans, target in planned:
        pieces = [[next(encoded) for _ in plan.pieces] for plan in plans]
        try:
            seqs = [
                assemble(plan, ids, encoder, job.max_length)
                for plan, ids in zip(plans, pieces, strict=True)
            ]
            job.check(seqs)
        except RecordError as err:
            out.errors.append((number, err))
            continue
        for seq in seqs:
            out.store.add(seq.input_ids, seq.target_mask, seq.truncated)
        if target is not None:
            out.targets.append(target)
        out.truncated += any(seq.truncated for seq in seqs)
        for name in unused_fields(record, job.fmt):
            out.unused[name] = out.unused.get(name, 0) + 1
    out.errors.sort(key=lambda e: e[0])
    return out


# a tokenizing process's job, its encoder and the function that tokenizes a chunk
_worker: tuple[Any, Encoder, Callable] | None = None


def _start_worker(job: Any, tokenize: Callable) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker = (job, Encoder(job.tokenizer), tokenize)


def _work(records: list[RawRecord]) -> Any:
    assert _worker is not None
    job, encoder, tokenize = _worker
    return tokenize(job, encoder, records)


def chunks_in_order(
    job: Any,
    encoder: Encoder,
    chunks: Iterator[list[RawRecord]],
    num_proc: int,
    tokenize: Callable[[Any, Encoder, list[RawRecord]], Any],
) -> Iterator[Any]:
    """`tokenize(job, encoder, records)` of each chunk, in order; on `num_proc` processes a few
    chunks ahead (`tokenize` a module-level function, `job` picklable with a `tokenizer`)."""
    if num_proc <= 1:
        for records in chunks:
            yield tokenize(job, encoder, records)
        return
    # fork where there is one: no re-import of the caller's main module (a script without an
    # `if __name__ == "__main__"` guard works) and a fast start; the workers only tokenize
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        num_proc, mp_context=get_context(method), initializer=_start_worker,
        initargs=(job, tokenize),
    )  # fmt: skip
    try:
        ahead: deque = deque()
        for records in chunks:
            ahead.append(pool.submit(_work, records))
            if len(ahead) >= 2 * num_proc:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _load(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    max_length: int,
    on_bad_record: str,
    split: str,
    columns: dict[str, str] | None = None,
    format: str = "auto",
    *,
    score_range: tuple[float, float] | None = None,
    label_threshold: float | None = None,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Items, DataReport]:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if num_proc < 1:
        raise ValueError(f"num_proc (data.num_proc) must be at least 1, got {num_proc}")
    encoder = Encoder(tokenizer)
    src = open_source(source, split, lazy=True)  # lines parsed where they are tokenized
    key = None
    if cache_dir is not None and (source_fp := src.fingerprint()) is not None:
        options = {
            "kind": kind, "format": format, "columns": columns, "split": split,
            "max_length": max_length, "on_bad_record": on_bad_record,
            "score_range": score_range, "label_threshold": label_threshold,
        }  # fmt: skip
        key = cache_key(source_fp, tokenizer_fingerprint(tokenizer), options)
        hit = cache.read(cache_dir, key)
        if hit is not None:
            items, report = hit
            report.source, report.cached = src.name, True
            log.info("%s: %d items from the data cache (%s)", src.name, len(items), key[:12])
            return items, report
    report = DataReport(source=src.name, n_records=0, n_kept=0, skipped={}, truncated=0)

    def bad(number: int, err: RecordError) -> None:
        located = err.located(src.name, number, src.unit)
        if err.fatal or on_bad_record == "error":
            raise located from None
        report.skipped[err.reason] = report.skipped.get(err.reason, 0) + 1
        if sum(report.skipped.values()) <= MAX_LOGGED_SKIPS:
            log.warning("skipped: %s", located)

    records = iter(src.records)
    fmt: Format | None = None
    first = None
    for raw in records:  # the format is the first readable record's
        raw = raw.parsed()
        if raw is None:
            continue
        report.n_records += 1
        try:
            if raw.error is not None:
                raise raw.error
            fmt = detect_format(_rename(raw.value, columns) if columns else raw.value, kind, format)
        except RecordError as err:
            bad(raw.number, err)
            continue
        first = raw
        break
    builder, targets = StoreBuilder(), []
    if fmt is not None:
        job = _Job(kind, fmt, tokenizer, max_length, columns, score_range, label_threshold)

        def chunks() -> Iterator[list[RawRecord]]:
            batch = [first]
            for raw in records:
                report.n_records += 1
                batch.append(raw)
                if len(batch) == CHUNK_RECORDS:
                    yield batch
                    batch = []
            if batch:
                yield batch

        for chunk in chunks_in_order(job, encoder, chunks(), num_proc, _tokenize_chunk):
            report.n_records -= chunk.blank
            for number, err in chunk.errors:
                bad(number, err)
            builder.add_store(chunk.store)
            targets += chunk.targets
            report.truncated += chunk.truncated
            for name, n in chunk.unused.items():
                report.unused_columns[name] = report.unused_columns.get(name, 0) + n
    width = 2 if kind == "pairs" else 1
    report.n_kept = len(builder) // width
    if not report.n_kept:
        if report.n_records == 0:
            raise DataError(src.name, None, None, "no records")
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
        detail = f"all {report.n_records} records were skipped ({reasons})"
        raise DataError(src.name, None, None, detail, reason="empty")
    if report.skipped or report.truncated or report.unused_columns:
        log.info(report.summary())
    store = builder.build()
    feedback = "label" if fmt.name != "score" or label_threshold is not None else "score"
    target = np.array(targets, dtype=np.float64) if kind == "unpaired" else None
    items = Items(store, kind, np.arange(len(store)), target, feedback)
    if key is not None and cache.write(cache_dir, key, items, report) is not None:
        cached = cache.read(cache_dir, key)  # memory-mapped: the arrays built here can go
        if cached is not None:
            items = cached[0]
    return items, report


def _rename(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Standard field names from the source's: `columns` maps standard -> source name."""
    out = dict(record)
    for standard, name in columns.items():
        if name in out:
            out[standard] = out.pop(name)
    return out
