"""Batched generation on chat prompts, the prompts (and reference answers) read from a data
file, and the generations written as JSONL.

A prompt is a list of `{"role", "content"}` messages, rendered with the tokenizer's chat template
and its generation prompt (`add_generation_prompt=True`), or a plain string, used as it is (as
plain-text training data is: the tokenizer's own special tokens such as BOS added, no template).
Prompts are left-padded and generated in batches of similar length by unitune's decode loop
(`unitune.models.decode`: Hugging Face `generate`'s tokens, token for token, faster); decoding is
greedy unless `do_sample` is set, and sampling draws from a generator seeded with `seed` inside a
forked RNG, so generating neither depends on nor moves the caller's random state. Responses are
the new tokens decoded with special tokens stripped.

`load_prompts` reads a preference file (prompt + chosen: the chosen response is the reference) or
an SFT file (messages: every turn up to the last assistant message is the prompt, that message the
reference) through `unitune.data`'s readers and checks, so a bad record is a `DataError` naming
the file, the line and the field.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unitune.core.io import atomic_write
from unitune.core.progress import ProgressBar
from unitune.data.errors import DataError, RecordError
from unitune.data.formats import open_source
from unitune.data.validation import (
    ChatExample,
    Example,
    detect_format,
    detect_pref_kind,
    validate_preference,
    validate_sft,
)
from unitune.models.decode import decode
from unitune.models.modes import eval_mode

Message = dict[str, Any]
Prompt = list[Message] | str


class GenerationError(ValueError):
    """Generation cannot run (no chat template for conversational prompts, bad options)."""


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt and its reference response, from `load_prompts`."""

    prompt: Prompt
    reference: str
    where: str  # "FILE: line N"


# --------------------------------------------------------------------------------------------
# Generation


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text a prompt is generated from: the chat template with the generation prompt for a
    message list, the string itself for a plain prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            "conversational prompts need a tokenizer with a chat template; this one has none"
        )
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise GenerationError(f"the chat template returned {type(text).__name__}, not text")
    return text


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    console: Any = None,
    streamer: Any = None,
) -> list[str]:
    """The model's response to each prompt, in order, special tokens stripped.

    Greedy by default; `do_sample=True` samples at `temperature` / `top_p` from a generator seeded
    with `seed` (the caller's RNG state is restored afterwards). The model is put in eval mode and
    given back in the mode it had. `progress` shows a rich progress bar over the prompts;
    `streamer` (a transformers streamer) needs `batch_size=1` or a single prompt.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise GenerationError("max_new_tokens and batch_size must be at least 1")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise GenerationError("sampling needs temperature > 0 and top_p in (0, 1]")
    if not prompts:
        return []
    texts = [render_prompt(tokenizer, p) for p in prompts]
    plain = [isinstance(p, str) for p in prompts]
    encoded = [
        tokenizer(t, add_special_tokens=is_plain)["input_ids"]
        for t, is_plain in zip(texts, plain, strict=True)
    ]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if streamer is not None and len(batches[0]) > 1:
        raise GenerationError("streaming generates one prompt at a time (batch_size=1)")
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    options = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    device = _device(model)
    out: list[str] = [""] * len(prompts)
    bar = ProgressBar("generating", len(prompts), console=console, enabled=progress, transient=True)
    with eval_mode(model), forked_rng(device, seed), bar:
        for batch in batches:
            ids, mask = left_pad([encoded[i] for i in batch], pad, device)
            with torch.inference_mode():
                new = decode(
                    model, ids, mask, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad,
                    do_sample=do_sample, streamer=streamer, **options,
                ).tokens  # fmt: skip
            for row, i in zip(new.tolist(), batch, strict=True):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.advance(len(batch))
    return out


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and each EOS id of the model's
    generation config (several for some models: Llama 3's <|eot_id|>, Phi-3.5's <|end|>)."""
    eos: list[int] = []
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tokenizer.eos_token_id, own):
        for i in e if isinstance(e, (list, tuple)) else [e]:
            if i is not None and i not in eos:
                eos.append(int(i))
    return eos


def left_pad(
    rows: list[list[int]], pad_id: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    pad = 0 if pad_id is None else pad_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG (CPU and the model's CUDA device) inside a fork, restored on exit."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Prompts and references from a data file


def load_prompts(
    source: str | os.PathLike,
    *,
    kind: str = "auto",
    split: str = "train",
    columns: dict[str, str] | None = None,
    max_samples: int | None = None,
    on_bad_record: str = "error",
) -> list[EvalPrompt]:
    """Prompts and reference responses from a preference or SFT dataset (any source
    `unitune.data` reads: JSONL, JSON, Parquet, a saved dataset or a hub id).

    - preference pairs (`kind="pairs"`, or detected from `chosen` / `rejected`): the prompt
      and the chosen response (its last assistant message for a conversation);
    - SFT demonstrations (`kind="demonstrations"`): a conversation's messages up to its last
      assistant message are the prompt and that message is the reference; prompt/completion
      records give their prompt and completion.

    `columns` renames fields as in the data config. A bad record raises `DataError` naming the
    file, the line (or record) and the field; unpaired feedback (label / score) is refused, it has
    no reference response. `on_bad_record="skip"` leaves bad records out instead (a problem of
    the whole file is still raised). `max_samples`: the first N records.
    """
    if kind not in ("auto", "pairs", "demonstrations"):
        raise ValueError(f"kind must be auto, pairs or demonstrations, got {kind!r}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be error or skip, got {on_bad_record!r}")
    src = open_source(source, split)
    out: list[EvalPrompt] = []
    fmt = None
    for raw in src.records:
        if max_samples is not None and len(out) >= max_samples:
            break
        raw = raw.parsed()
        if raw is None:
            continue
        where = f"{src.name}: {src.unit} {raw.number}"
        try:
            if raw.error is not None:
                raise raw.error
            record = _renamed(raw.value, columns)
            if fmt is None:
                if kind == "auto":
                    kind = _detect_kind(record)
                fmt = detect_format(record, kind)
            if kind == "pairs":
                example = validate_preference(record, fmt)[0]
            else:
                example = validate_sft(record, fmt)
            prompt, reference = _split(example)
        except RecordError as err:
            if on_bad_record == "skip" and not err.fatal:
                continue
            raise err.located(src.name, raw.number, src.unit) from None
        out.append(EvalPrompt(prompt, reference, where))
    if not out:
        raise DataError(src.name, None, None, "no records")
    return out


def _renamed(record: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    if not columns:
        return record
    back = {theirs: ours for ours, theirs in columns.items()}
    return {back.get(k, k): v for k, v in record.items()}


def _detect_kind(record: dict[str, Any]) -> str:
    keys = {k for k, v in record.items() if v is not None}
    if keys & {"chosen", "rejected"}:
        if detect_pref_kind(record) == "pairs":
            return "pairs"
    if keys & {"label", "score"}:
        raise RecordError(
            None,
            "unknown_format",
            "unpaired feedback (label / score) has no reference response; use preference "
            "pairs (prompt, chosen, rejected) or SFT data (messages, prompt/completion)",
        )
    return "demonstrations"


def _split(example: Example) -> tuple[Prompt, str]:
    """(prompt, reference) of a validated example: the last assistant message is the
    reference and everything before it the prompt."""
    if isinstance(example, ChatExample):
        messages = example.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return list(messages[:last]), messages[last]["content"].strip()
    return example.prompt, example.response.strip()


# --------------------------------------------------------------------------------------------
# Output


def write_generations(
    path: str | os.PathLike,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    references: Sequence[str | None] | None = None,
) -> Path:
    """Write one JSON line per prompt, `{"prompt", "response", "reference"}`, atomically (a
    temporary file in the same directory, then a rename); return the path."""
    refs = list(references) if references is not None else [None] * len(prompts)
    if not len(prompts) == len(responses) == len(refs):
        raise ValueError("prompts, responses and references must have the same length")
    lines = [
        json.dumps({"prompt": p, "response": r, "reference": ref}, ensure_ascii=False) + "\n"
        for p, r, ref in zip(prompts, responses, refs, strict=True)
    ]
    return atomic_write(path, "".join(lines))
