"""Tokenized data in compact arrays, and lazy views of it as items.

A `TokenStore` holds every sequence of one loaded source in four flat arrays: the token ids
(int32) and target masks (uint8) of all sequences end to end, each sequence's start offset
(int64) and its `truncated` flag and first target position. A 1M-record dataset is then a few
arrays (memory-mapped when read from the data cache, see `unitune.data.cache`), not millions of
Python tuples of ints.

`Items` is what the loaders return: a read-only sequence of `Sequence`s (SFT), `Pair`s or
`Feedback` over a store. An item is built only when it is indexed (a batch, a scored sequence),
so memory stays flat as the dataset grows. Slicing and `take` give views (no copy of tokens);
`sequences()` is the flattened view the model sees: pairs as all chosen then all rejected.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from unitune.data.sequences import Feedback, Pair, Sequence

ItemKind = Literal["demonstrations", "pairs", "unpaired"]


@dataclass(frozen=True)
class TokenStore:
    """All sequences of a source: `ids[offsets[s]:offsets[s + 1]]` is sequence `s`."""

    ids: np.ndarray  # int32 [tokens]
    mask: np.ndarray  # uint8 [tokens], 1 where the token is a target
    offsets: np.ndarray  # int64 [sequences + 1]
    truncated: np.ndarray  # bool [sequences]
    first_target: np.ndarray  # int32 [sequences]: position of the first target token

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, s: int) -> Sequence:
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        ids = tuple(self.ids[a:b].tolist())
        return Sequence(ids, tuple(self.mask[a:b].tolist()), bool(self.truncated[s]))

    def lengths(self, seqs: np.ndarray) -> np.ndarray:
        return self.offsets[seqs + 1] - self.offsets[seqs]

    @property
    def nbytes(self) -> int:
        arrays = (self.ids, self.mask, self.offsets, self.truncated, self.first_target)
        return sum(a.nbytes for a in arrays)


class StoreBuilder:
    """Appends tokenized sequences to growing arrays (stdlib `array`, 4 + 1 bytes a token)."""

    def __init__(self) -> None:
        self.ids, self.mask = array("i"), bytearray()
        self.offsets, self.truncated, self.first_target = array("q", [0]), bytearray(), array("i")

    def add(self, ids: Iterable[int], mask: Iterable[int], truncated: bool) -> None:
        """Append one sequence."""
        start = len(self.mask)
        self.ids.extend(ids)
        self.mask.extend(mask)
        self.offsets.append(len(self.mask))
        self.truncated.append(bool(truncated))
        self.first_target.append(self.mask.index(1, start) - start)

    def add_store(self, other: StoreBuilder) -> None:
        """Append all sequences of `other`."""
        base = len(self.mask)
        self.ids.extend(other.ids)
        self.mask.extend(other.mask)
        self.offsets.extend(o + base for o in other.offsets[1:])
        self.truncated.extend(other.truncated)
        self.first_target.extend(other.first_target)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def build(self) -> TokenStore:
        return TokenStore(
            ids=np.frombuffer(self.ids, dtype=np.int32),
            mask=np.frombuffer(self.mask, dtype=np.uint8),
            offsets=np.frombuffer(self.offsets, dtype=np.int64),
            truncated=np.frombuffer(self.truncated, dtype=np.bool_),
            first_target=np.frombuffer(self.first_target, dtype=np.int32),
        )


class Items(SequenceABC):
    """A dataset's items over a `TokenStore`, built on access.

    `seqs[i]` holds the store indices of item `i`'s sequences: one for "demonstrations" and
    "unpaired" items, (chosen, rejected) for "pairs". Unpaired items have a `target` in [0, 1]
    each and one `feedback_kind` ("label" or "score"); their `prompt_len` is the sequence's first
    target.
    """

    def __init__(
        self,
        store: TokenStore,
        kind: ItemKind,
        seqs: np.ndarray,
        target: np.ndarray | None = None,
        feedback_kind: Literal["label", "score"] = "label",
    ) -> None:
        width = 2 if kind == "pairs" else 1
        seqs = np.asarray(seqs, dtype=np.int64).reshape(-1, width)
        if kind == "unpaired" and (target is None or len(target) != len(seqs)):
            raise ValueError("feedback items need one target per item")
        self.store, self.kind, self.seqs = store, kind, seqs
        self.target = None if target is None else np.asarray(target, dtype=np.float64)
        self.feedback_kind = feedback_kind

    def __len__(self) -> int:
        return len(self.seqs)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Items: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        row = self.seqs[i]
        if self.kind == "pairs":
            return Pair(self.store.sequence(int(row[0])), self.store.sequence(int(row[1])))
        seq = self.store.sequence(int(row[0]))
        if self.kind == "unpaired":
            prompt_len = int(self.store.first_target[row[0]])
            return Feedback(seq, float(self.target[i]), prompt_len, self.feedback_kind)
        return seq

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SequenceABC) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: object) -> Items | list:
        """Items of one store and kind concatenate as a view; anything else as a list."""
        if isinstance(other, Items) and other.store is self.store and other.kind == self.kind:
            target = None if self.target is None else np.concatenate([self.target, other.target])
            seqs = np.concatenate([self.seqs, other.seqs])
            return Items(self.store, self.kind, seqs, target, self.feedback_kind)
        if isinstance(other, Iterable):
            return list(self) + list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Items({self.kind}, {len(self)} items, {len(self.store.ids)} tokens in store)"

    def take(self, indices: Iterable[int] | np.ndarray) -> Items:
        """The items at `indices`, in that order (a view: tokens are not copied)."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
        idx = idx.astype(np.int64, copy=False)
        target = None if self.target is None else self.target[idx]
        return Items(self.store, self.kind, self.seqs[idx], target, self.feedback_kind)

    def sequences(self) -> Items:
        """The sequences the model sees, as "demonstrations" items: pairs as all chosen, then all
        rejected."""
        order = np.concatenate([self.seqs[:, 0], self.seqs[:, 1]]) if self.kind == "pairs" else None
        return Items(self.store, "demonstrations", self.seqs[:, 0] if order is None else order)

    def lengths(self) -> np.ndarray:
        """Each item's length in tokens (a pair's is its longer sequence's)."""
        return self.store.lengths(self.seqs).max(axis=1)

    def unpaired(self) -> Items:
        """Pairs as feedback: chosen desirable (1.0), then its rejected undesirable (0.0)."""
        if self.kind != "pairs":
            raise ValueError(f"only pairs can be unpaired, these are {self.kind}")
        target = np.tile(np.array([1.0, 0.0]), len(self))
        return Items(self.store, "unpaired", self.seqs.reshape(-1), target, "label")

    def n_targets(self) -> np.ndarray:
        """Each "demonstrations" item's number of target tokens."""
        if self.kind != "demonstrations":
            raise ValueError("n_targets() is for sequences; use sequences() first")
        sums = np.add.reduceat(self.store.mask.astype(np.int64), self.store.offsets[:-1])
        empty = self.store.offsets[1:] == self.store.offsets[:-1]
        return np.where(empty, 0, sums)[self.seqs[:, 0]]

    def fingerprint_into(self, digest: Any) -> None:
        """Feed `data_fingerprint`'s bytes for these items into `digest` without building them."""
        st = self.store
        tag = {"demonstrations": b"S", "pairs": b"P", "unpaired": b"F"}[self.kind]
        for i, row in enumerate(self.seqs):
            digest.update(tag)
            for s in row:
                a, b = int(st.offsets[s]), int(st.offsets[s + 1])
                digest.update(struct.pack("<q", b - a))
                digest.update(st.ids[a:b].astype("<i8").tobytes())
                digest.update(st.mask[a:b].tobytes())
            if self.kind == "unpaired":
                digest.update(struct.pack("<d", float(self.target[i])))
