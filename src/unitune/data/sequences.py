"""Tokenized examples (`Sequence`, `Pair`, `Feedback`), KTO's mismatched pairs, the fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Sequence:
    """One tokenized example.

    Token `i` with `target_mask[i] == 1` is scored as `log p(input_ids[i] | input_ids[:i])`.
    Position 0 is never a target, prompt tokens are never targets, and the last target token
    is EOS unless the response was cut to fit `max_length` (`truncated`).
    """

    input_ids: tuple[int, ...]
    target_mask: tuple[int, ...]  # same length; 1 where the token is a response (target) token
    truncated: bool = False  # the response was cut to fit max_length

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and target_mask ({len(self.target_mask)}) "
                "differ in length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Pair:
    """A preference pair: the same prompt with a chosen and a rejected response."""

    chosen: Sequence
    rejected: Sequence


@dataclass(frozen=True)
class Feedback:
    """Unpaired feedback: one prompt + completion (`seq`) with its target in [0, 1].

    `target` is 1.0 (desirable) / 0.0 (undesirable) for a label, or the score mapped to [0, 1]
    by `(score - lo) / (hi - lo)`. `prompt_len` is the number of leading non-target tokens of
    `seq`: `seq.input_ids[:prompt_len]` is the prompt (with the chat template's generation
    prompt) and the completion starts at `prompt_len`, so a prompt can be joined to another
    item's completion (`mismatched`). `kind` says whether the source gave labels or scores.
    """

    seq: Sequence
    target: float
    prompt_len: int
    kind: Literal["label", "score"] = "label"

    def __post_init__(self) -> None:
        if self.kind not in ("label", "score"):
            raise ValueError(f"kind must be 'label' or 'score', got {self.kind!r}")
        if not (math.isfinite(self.target) and 0.0 <= self.target <= 1.0):
            raise ValueError(f"target must be in [0, 1], got {self.target}")
        if self.kind == "label" and self.target not in (0.0, 1.0):
            raise ValueError(f"a label's target is 0.0 or 1.0, got {self.target}")
        if not 1 <= self.prompt_len < len(self.seq):
            raise ValueError(
                f"prompt_len must be in [1, {len(self.seq)}) for a sequence of {len(self.seq)} "
                f"tokens, got {self.prompt_len}"
            )


def feedback_kind(items: Iterable[Feedback]) -> Literal["label", "score"]:
    """The kind of feedback all `items` carry, "label" or "score" (they must agree)."""
    kinds = {item.kind for item in items}
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) if kinds else "no items"
        raise ValueError(f"expected feedback of one kind, label or score; got {found}")
    return kinds.pop()


def mismatched(items: list[Feedback], batch: list[int]) -> list[Sequence]:
    """KTO's mismatched (prompt, completion) pairs for one batch, as TRL builds its KL batch.

    For batch position `i`: the prompt of `items[batch[i]]` followed by the completion of
    `items[batch[(i + 1) % len(batch)]]` (its tokens from `prompt_len` on, with their target
    mask); a batch of one pairs an item with itself. Prompts and completions were tokenized
    separately, so joining them needs no re-tokenization.

    Truncation: a joined sequence is cut to the longest sequence of the batch itself
    (`max(len(items[k].seq) for k in batch)`, never more than `max_length`) by cutting the
    completion's end; the prompt is never cut (it fit in its own item) and at least one target
    token always remains. A cut sequence, or one whose completion was already cut, has
    `truncated` set; tokens left after the last target token are dropped as usual.
    """
    if not batch:
        raise ValueError("mismatched() needs a non-empty batch")
    limit = max(len(items[k].seq) for k in batch)
    out = []
    for i, k in enumerate(batch):
        prompt_of = items[k]
        completion_of = items[batch[(i + 1) % len(batch)]]
        n, m = prompt_of.prompt_len, completion_of.prompt_len
        ids = list(prompt_of.seq.input_ids[:n] + completion_of.seq.input_ids[m:])
        mask = [0] * n + list(completion_of.seq.target_mask[m:])
        truncated = completion_of.seq.truncated
        if len(ids) > limit:
            ids, mask = drop_tail(ids[:limit], mask[:limit])
            truncated = True
        out.append(Sequence(tuple(ids), tuple(mask), truncated))
    return out


def drop_tail(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """Drop the tokens after the last target token."""
    end = len(mask)
    while end > 0 and mask[end - 1] == 0:
        end -= 1
    return ids[:end], mask[:end]


def data_fingerprint(items: Iterable[Sequence | Pair | Feedback]) -> str:
    """sha256 over the token ids and target masks (and feedback targets; a prompt's ids and its
    other columns), in order.

    Stable across processes. Used as the key of the reference log-prob cache: equal data gives
    an equal key. Items over a token store (`unitune.data.store.Items`) feed the same bytes from
    their arrays, without building each item.
    """
    digest = hashlib.sha256()
    if hasattr(items, "fingerprint_into"):
        items.fingerprint_into(digest)
        return digest.hexdigest()
    for item in items:
        if isinstance(item, Pair):
            digest.update(b"P")
            _update(digest, item.chosen)
            _update(digest, item.rejected)
        elif isinstance(item, Sequence):
            digest.update(b"S")
            _update(digest, item)
        elif isinstance(item, Feedback):
            digest.update(b"F")
            _update(digest, item.seq)
            digest.update(struct.pack("<d", item.target))
        elif hasattr(item, "prompt_ids"):  # a PromptItem (data/prompts.py) of an online slot
            digest.update(b"Q")
            ids = item.prompt_ids
            digest.update(struct.pack(f"<q{len(ids)}q", len(ids), *ids))
            digest.update(json.dumps(item.columns, sort_keys=True, default=str).encode())
        else:
            raise TypeError(f"expected Sequence, Pair, Feedback or a prompt, got {item!r:.60}")
    return digest.hexdigest()


def _update(digest, seq: Sequence) -> None:
    n = len(seq.input_ids)
    digest.update(struct.pack("<q", n))
    digest.update(struct.pack(f"<{n}q", *seq.input_ids))
    digest.update(bytes(seq.target_mask))
