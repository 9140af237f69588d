"""Prompt data for online training: the prompts an online preference objective samples from.

Accepted records (the form is the first readable record's; every later record must have it):

- `{"prompt": str}`: plain text. Generation starts from the tokenizer's leading special tokens
  (BOS, if it adds one) followed by the prompt's tokens, exactly the tokens a plain
  prompt/completion SFT record has before its completion (`unitune.data.tokenize`).
- `{"prompt": [messages]}` or `{"messages": [messages]}`: a conversation ending in a user turn,
  rendered with the chat template and the generation prompt (`add_generation_prompt=True`),
  exactly the tokens a conversational SFT record has before its assistant turn.
- a preference pair (`prompt` + `chosen` + `rejected`, or any other pairs form of
  `unitune.data.validation`: `chosen`/`rejected` with the prompt implicit, or UltraFeedback's
  prompt repeated in the conversations): the prompt is extracted as the pairs loader extracts
  it, and the pair is checked as the pairs loader checks it, so a file gives the same prompts
  online as offline. `chosen` and `rejected` stay in `columns`.

A conversation must end in a user turn. One that ends in an assistant turn (an SFT `messages`
record) is refused, not cut: which answer to drop, and whether to keep it as a reference, is the
user's call. Give such data as `prompt` (the messages up to the user turn) and `completion`
(the answer): a `completion` is kept as a column like any other. The prompt's source field
(`prompt` or `messages`) is read; every other column of the record is kept unchanged in
`PromptItem.columns` (for example `answer`, for a verifiable reward), under the standard name
`columns=` gives it (`{"prompt": "question", "answer": "solution"}` reads `question` as the
prompt and gives reward functions `answer`).

A bad record (no prompt, a wrong type, an empty prompt, a conversation that does not end in a
user turn, an unknown role, or a pair the pairs loader refuses) raises a `DataError` naming the
file, the line (JSONL) or record, and the field; with `on_bad_record="skip"` it is skipped and
counted in `DataReport.skipped` by reason. A prompt longer than `max_length - max_new_tokens`
tokens leaves no room for the completion: it is skipped in both modes, counted as
`skipped["too_long"]` and logged (the first few by location, then the total) — never silently.
Prompt data is not kept in the tokenized-data cache (`unitune.data.cache`): prompts are short
and tokenizing them is cheap next to generating from them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.data.errors import DataError, DataReport, RecordError
from unitune.data.formats import RawRecord, open_source
from unitune.data.load import (
    CHUNK_RECORDS,
    MAX_LOGGED_SKIPS,
    SourceLike,
    _rename,
    chunks_in_order,
)
from unitune.data.tokenize import Encoder
from unitune.data.validation import (
    Format,
    TextExample,
    _messages,
    _present,
    _type_name,
    detect_format,
    validate_preference,
)

log = logging.getLogger(__name__)

PAIR_FIELDS = ("chosen", "rejected")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of an online preference slot."""

    prompt: str | list[dict[str, Any]]  # a plain string, or messages ending in a user turn
    columns: dict[str, Any]  # every other column of the record, unchanged
    where: str  # "FILE: line N" (or "record N"): names the record in reward errors
    prompt_ids: list[int]  # the tokens generation starts from (see the module docstring)

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class _Form:
    """The dataset's record form: "prompt", "messages" or "pairs" (with the pairs `Format`)."""

    name: str
    conversational: bool
    pairs: Format | None = None


def _detect(record: dict[str, Any]) -> _Form:
    """The form of a record, from its keys (and whether `prompt` is a string or messages)."""
    present = _present(record)
    if present & set(PAIR_FIELDS):
        fmt = detect_format(record, "pairs")
        return _Form("pairs", fmt.conversational, fmt)
    if "prompt" in present:
        value = record["prompt"]
        if not isinstance(value, (str, list)):
            detail = f"expected a string or a list of messages, got {_type_name(value)}"
            raise RecordError("prompt", "wrong_type", detail)
        return _Form("prompt", isinstance(value, list))
    if "messages" in present:
        return _Form("messages", True)
    keys = ", ".join(repr(k) for k in sorted(present)) or "none"
    detail = (
        f"missing (keys: {keys}); a prompt record has 'prompt' (a string, or messages ending "
        "in a user turn), 'messages' ending in a user turn, or is a preference pair (prompt, "
        "chosen, rejected)"
    )
    raise RecordError("prompt", "missing_field", detail)


def _read(record: dict[str, Any], form: _Form) -> tuple[str | list[dict], str | None, str]:
    """(the prompt, the field it was read from or None, the field errors name)."""
    present = _present(record)
    if form.name == "pairs":
        chosen, _ = validate_preference(record, form.pairs)
        source = "prompt" if form.pairs.name in ("explicit", "repeated") else None
        if isinstance(chosen, TextExample):
            return _text(chosen.prompt, chosen.prompt_field), source, chosen.prompt_field
        prompt = chosen.messages[: chosen.first_target]
        _check_turns(prompt, chosen.prompt_field, conversation=False)
        return prompt, source, chosen.prompt_field
    name, other = ("prompt", "messages") if form.name == "prompt" else ("messages", "prompt")
    if other in present:
        detail = f"unexpected together with '{name}' (this dataset's prompts are in '{name}')"
        raise RecordError(other, "unexpected_field", detail)
    if name not in present:
        raise RecordError(name, "missing_field", f"missing (this dataset's prompts are '{name}')")
    if not form.conversational:
        value = record[name]
        if not isinstance(value, str):
            detail = f"expected a string like the dataset's first prompt, got {_type_name(value)}"
            raise RecordError(name, "wrong_type", detail)
        return _text(value, name), name, name
    messages = _messages(record, name)
    _check_turns(messages, name, conversation=form.name == "messages")
    return messages, name, name


def _text(prompt: str, name: str) -> str:
    if not prompt.strip():
        raise RecordError(name, "empty_prompt", "empty or whitespace-only prompt")
    return prompt


def _check_turns(messages: list[dict[str, Any]], name: str, *, conversation: bool) -> None:
    """A prompt conversation is not empty and ends in a non-empty user turn."""
    if not messages:
        raise RecordError(name, "empty_prompt", "no messages")
    i, last = len(messages) - 1, messages[-1]
    if last["role"] != "user":
        detail = f"{name}[{i}]: the prompt must end in a user turn, this is a {last['role']} turn"
        if conversation and last["role"] == "assistant":
            detail += (
                " (to use a conversation with its answer, give the messages up to the user turn "
                "as 'prompt' and the answer as 'completion': it is kept as a column)"
            )
        raise RecordError(name, "not_user_last", detail)
    if not last["content"].strip():
        raise RecordError(name, "empty_prompt", f"{name}[{i}]: empty user message")


@dataclass(frozen=True)
class _Job:
    """What turning records into `PromptItem`s needs; sent once to each tokenizing process."""

    form: _Form
    tokenizer: PreTrainedTokenizerBase
    columns: dict[str, str] | None
    source: str  # the source's name and unit, for `PromptItem.where`
    unit: str
    limit: int  # max_length - max_new_tokens: the longest prompt kept


@dataclass
class _Chunk:
    items: list[PromptItem] = field(default_factory=list)
    errors: list[tuple[int, RecordError]] = field(default_factory=list)  # by record number


def _prompt_chunk(job: _Job, encoder: Encoder, records: list[RawRecord]) -> _Chunk:
    """Validate every record, render its prompt, encode all of them in one batched call."""
    out = _Chunk()
    planned = []
    for raw in records:
        try:
            if raw.error is not None:
                raise raw.error
            record = _rename(raw.value, job.columns) if job.columns else raw.value
            prompt, source, name = _read(record, job.form)
            if isinstance(prompt, str):
                text, prefix = prompt, True  # as plain SFT text: leading special tokens first
            else:
                try:
                    text, prefix = encoder.render(prompt, generation_prompt=True), False
                except RecordError as err:
                    err.field = err.field or name
                    raise
            columns = {k: v for k, v in record.items() if k != source}
            planned.append((raw.number, prompt, columns, name, text, prefix))
        except RecordError as err:
            out.errors.append((raw.number, err))
    encoded = encoder.encode_many([p[4] for p in planned])
    for (number, prompt, columns, name, _, prefix), ids in zip(planned, encoded, strict=True):
        ids = (list(encoder.prefix) if prefix else []) + list(ids)
        if len(ids) > job.limit:
            detail = (
                f"the prompt is {len(ids)} tokens; max_length - max_new_tokens leaves "
                f"{job.limit} for it (skipped)"
            )
            out.errors.append((number, RecordError(name, "too_long", detail)))
            continue
        where = f"{job.source}: {job.unit} {number}"
        out.items.append(PromptItem(prompt, columns, where, ids))
    out.errors.sort(key=lambda e: e[0])
    return out


def load_prompt_data(
    source: SourceLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    max_length: int = 512,
    max_new_tokens: int = 64,
    on_bad_record: str = "error",
    num_proc: int = 1,
) -> tuple[list[PromptItem], DataReport]:
    """Load the prompts of an online preference slot (see the module docstring for the forms).

    `source` is anything `unitune.data` reads (JSONL, JSON, Parquet, a `datasets` directory, a
    hub id, a list of dicts); `split` picks a split of a `datasets` directory or hub id;
    `columns` maps standard names to the source's (`{"prompt": "question"}`). A prompt longer
    than `max_length - max_new_tokens` tokens is skipped and counted (`skipped["too_long"]`).
    `num_proc`: processes that render and tokenize. A dataset with no usable prompt is a
    `DataError`.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_length - max_new_tokens < 1:
        raise ValueError(
            f"max_length (data.max_length) {max_length} leaves no room for a prompt with "
            f"max_new_tokens (online.max_new_tokens) {max_new_tokens}"
        )
    if num_proc < 1:
        raise ValueError(f"num_proc (data.num_proc) must be at least 1, got {num_proc}")
    encoder = Encoder(tokenizer)
    src = open_source(source, split)
    report = DataReport(source=src.name, n_records=0, n_kept=0)

    def bad(number: int, err: RecordError) -> None:
        located = err.located(src.name, number, src.unit)
        # a prompt too long to leave room for the completion is skipped in both modes
        if err.reason != "too_long" and (err.fatal or on_bad_record == "error"):
            raise located from None
        report.skipped[err.reason] = report.skipped.get(err.reason, 0) + 1
        same = report.skipped["too_long"] if err.reason == "too_long" else others()
        if same <= MAX_LOGGED_SKIPS:
            log.warning("skipped: %s", located)

    def others() -> int:
        return sum(n for reason, n in report.skipped.items() if reason != "too_long")

    records = iter(src.records)
    form, first = None, None
    for raw in records:  # the form is the first readable record's
        report.n_records += 1
        try:
            if raw.error is not None:
                raise raw.error
            form = _detect(_rename(raw.value, columns) if columns else raw.value)
        except RecordError as err:
            bad(raw.number, err)
            continue
        first = raw
        break
    items: list[PromptItem] = []
    if form is not None:
        limit = max_length - max_new_tokens
        job = _Job(form, tokenizer, columns, src.name, src.unit, limit)

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

        for chunk in chunks_in_order(job, encoder, chunks(), num_proc, _prompt_chunk):
            for number, err in chunk.errors:
                bad(number, err)
            items += chunk.items
    report.n_kept = len(items)
    too_long = report.skipped.get("too_long", 0)
    if too_long:
        log.warning(
            "%s: %d prompts longer than max_length - max_new_tokens = %d tokens skipped "
            "(data.max_length %d, online.max_new_tokens %d)",
            src.name, too_long, max_length - max_new_tokens, max_length, max_new_tokens,
        )  # fmt: skip
    if not items:
        if report.n_records == 0:
            raise DataError(src.name, None, None, "no records")
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
        detail = f"all {report.n_records} records were skipped ({reasons})"
        if too_long:
            detail += "; raise data.max_length or lower online.max_new_tokens"
        raise DataError(src.name, None, None, detail, reason="empty")
    if report.skipped:
        log.info(report.summary())
    return items, report
