"""Load a dataset into `Sequence`s (SFT) or `Pair`s (preference).

Every record is read, validated and tokenized before anything is returned. With
`on_bad_record="error"` the first bad record raises a `DataError` naming the file, the 1-based
line (JSONL) or record, and the field; with `"skip"` bad records are counted in
`DataReport.skipped` by reason and loading goes on. Problems with the tokenizer or its chat
template are raised in both modes. A dataset with no usable record is an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.data.errors import DataError, DataReport, RecordError
from unitune.data.formats import open_source
from unitune.data.sequences import Pair, Sequence
from unitune.data.tokenize import Encoder, tokenize_example
from unitune.data.validation import Format, detect_format, validate_preference, validate_sft

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
) -> tuple[list[Sequence], DataReport]:
    """Load SFT data (prompt/completion or messages) as tokenized `Sequence`s.

    `columns` maps standard field names to the source's, e.g. `{"prompt": "instruction"}`.
    """
    return _load(source, tokenizer, "sft", _build_sft, max_length, on_bad_record, split, columns)


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


def _load(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    build: Callable[[dict[str, Any], Format, Encoder, int], Any],
    max_length: int,
    on_bad_record: str,
    split: str,
    columns: dict[str, str] | None = None,
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
                fmt = detect_format(raw.value, kind)
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
    report.n_kept = len(items)
    if not items:
        if report.n_records == 0:
            raise DataError(src.name, None, None, "no records")
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
        detail = f"all {report.n_records} records were skipped ({reasons})"
        raise DataError(src.name, None, None, detail, reason="empty")
    if report.skipped or report.truncated:
        log.info(report.summary())
    return items, report


def _rename(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Standard field names from the source's: `columns` maps standard -> source name."""
    out = dict(record)
    for standard, name in columns.items():
        if name in out:
            out[standard] = out.pop(name)
    return out


def _truncated(item: Sequence | Pair) -> bool:
    if isinstance(item, Pair):
        return item.chosen.truncated or item.rejected.truncated
    return item.truncated
