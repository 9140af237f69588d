"""Load a dataset into `Sequence`s (SFT), `Pair`s (preference pairs) or `Feedback` (unpaired).

Every record is read, validated and tokenized before anything is returned. With
`on_bad_record="error"` the first bad record raises a `DataError` naming the file, the 1-based
line (JSONL) or record, and the field; with `"skip"` bad records are counted in
`DataReport.skipped` by reason and loading goes on. Problems with the tokenizer or its chat
template are raised in both modes. A dataset with no usable record is an error. Columns the
format does not read are counted per kept record in `DataReport.unused_columns`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from unitune.data.errors import DataError, DataReport, RecordError
from unitune.data.formats import open_source
from unitune.data.sequences import Feedback, Pair, Sequence
from unitune.data.tokenize import Encoder, tokenize_example
from unitune.data.validation import (
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


def load_sft(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad_record: str = "error",
    split: str = "train",
    columns: dict[str, str] | None = None,
    format: str = "auto",
) -> tuple[list[Sequence], DataReport]:
    """Load SFT data (prompt/completion or messages) as tokenized `Sequence`s.

    `columns` maps standard field names to the source's, e.g. `{"prompt": "instruction"}`.
    `format="alpaca"` reads `instruction`, `input` and `output` (see `validation`); "auto"
    detects the format from the first record's keys.
    """
    return _load(
        source, tokenizer, "sft", _build_sft, max_length, on_bad_record, split, columns, format
    )


def load_preference(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    on_bad_record: str = "error",
    split: str = "train",
    columns: dict[str, str] | None = None,
) -> tuple[list[Pair], DataReport]:
    """Load preference data (explicit or implicit prompt) as tokenized `Pair`s."""
    return _load(
        source, tokenizer, "preference", _build_pair, max_length, on_bad_record, split, columns
    )


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
) -> tuple[list[Feedback], DataReport]:
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
    build = functools.partial(
        _build_feedback, score_range=score_range, label_threshold=label_threshold
    )
    return _load(source, tokenizer, "unpaired", build, max_length, on_bad_record, split, columns)


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


def _build_sft(record: dict[str, Any], fmt: Format, encoder: Encoder, max_length: int) -> Sequence:
    return tokenize_example(validate_sft(record, fmt), encoder, max_length)


def _build_pair(record: dict[str, Any], fmt: Format, encoder: Encoder, max_length: int) -> Pair:
    chosen_example, rejected_example = validate_preference(record, fmt)
    chosen = tokenize_example(chosen_example, encoder, max_length)
    rejected = tokenize_example(rejected_example, encoder, max_length)
    if chosen.input_ids == rejected.input_ids:
        after = "tokenization and truncation" if chosen.truncated else "tokenization"
        raise RecordError("chosen", "identical", f"identical to 'rejected' after {after}")
    return Pair(chosen, rejected)


def _build_feedback(
    record: dict[str, Any],
    fmt: Format,
    encoder: Encoder,
    max_length: int,
    *,
    score_range: tuple[float, float] | None,
    label_threshold: float | None = None,
) -> Feedback:
    example, target = validate_feedback(record, fmt, score_range)
    seq = tokenize_example(example, encoder, max_length)
    kind = fmt.name
    if kind == "score" and label_threshold is not None:
        target, kind = (1.0 if target >= label_threshold else 0.0), "label"
    return Feedback(seq, target, seq.target_mask.index(1), kind)  # type: ignore[arg-type]


def _load(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    build: Callable[[dict[str, Any], Format, Encoder, int], Any],
    max_length: int,
    on_bad_record: str,
    split: str,
    columns: dict[str, str] | None = None,
    format: str = "auto",
) -> tuple[list, DataReport]:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoder = Encoder(tokenizer)
    src = open_source(source, split)
    report = DataReport(source=src.name, n_records=0, n_kept=0, skipped={}, truncated=0)
    items = []
    fmt: Format | None = None
    for raw in src.records:
        report.n_records += 1
        try:
            if raw.error is not None:
                raise raw.error
            if columns:
                raw.value = _rename(raw.value, columns)
            if fmt is None:
                fmt = detect_format(raw.value, kind, format)
            item = build(raw.value, fmt, encoder, max_length)
        except RecordError as err:
            located = err.located(src.name, raw.number, src.unit)
            if err.fatal or on_bad_record == "error":
                raise located from None
            report.skipped[err.reason] = report.skipped.get(err.reason, 0) + 1
            n_skipped = sum(report.skipped.values())
            if n_skipped <= MAX_LOGGED_SKIPS:
                log.warning("skipped: %s", located)
            continue
        items.append(item)
        if _truncated(item):
            report.truncated += 1
        for name in unused_fields(raw.value, fmt):
            report.unused_columns[name] = report.unused_columns.get(name, 0) + 1
    report.n_kept = len(items)
    if not items:
        if report.n_records == 0:
            raise DataError(src.name, None, None, "no records")
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
        detail = f"all {report.n_records} records were skipped ({reasons})"
        raise DataError(src.name, None, None, detail, reason="empty")
    if report.skipped or report.truncated or report.unused_columns:
        log.info(report.summary())
    return items, report


def _rename(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Standard field names from the source's: `columns` maps standard -> source name."""
    out = dict(record)
    for standard, name in columns.items():
        if name in out:
            out[standard] = out.pop(name)
    return out


def _truncated(item: Sequence | Pair | Feedback) -> bool:
    if isinstance(item, Pair):
        return item.chosen.truncated or item.rejected.truncated
    if isinstance(item, Feedback):
        return item.seq.truncated
    return item.truncated
