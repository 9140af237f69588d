"""Tokenized examples (`Sequence`, `Pair`) and their fingerprint."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass


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


def data_fingerprint(items: Iterable[Sequence | Pair]) -> str:
    """sha256 over the token ids and target masks, in order; stable across processes.

    Used as the key of the reference log-prob cache: equal data gives an equal key.
    """
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, Pair):
            digest.update(b"P")
            _update(digest, item.chosen)
            _update(digest, item.rejected)
        elif isinstance(item, Sequence):
            digest.update(b"S")
            _update(digest, item)
        else:
            raise TypeError(f"expected Sequence or Pair, got {type(item).__name__}")
    return digest.hexdigest()


def _update(digest, seq: Sequence) -> None:
    n = len(seq.input_ids)
    digest.update(struct.pack("<q", n))
    digest.update(struct.pack(f"<{n}q", *seq.input_ids))
    digest.update(bytes(seq.target_mask))
