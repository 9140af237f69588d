"""Batch sequences by length and pad them into tensors.

Batching by length keeps padding low without packing (which is slower on CPU): the indices are
shuffled with the seed, split into mega-chunks of `batch_size * 50`, each chunk is sorted by
length and cut into batches, and the batch order is shuffled. Without shuffling all indices are
sorted by length. Every index appears exactly once; only the last batch may be short.
"""

from __future__ import annotations

import random

import torch

from unitune.data.sequences import Sequence

CHUNK_BATCHES = 50


def length_batches(
    lengths: list[int], batch_size: int, *, seed: int, shuffle: bool
) -> list[list[int]]:
    """Lists of indices into `lengths`, grouping similar lengths together."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(lengths)))
    if not shuffle:
        indices.sort(key=lambda i: lengths[i])
        return _cut(indices, batch_size)
    rng = random.Random(seed)
    rng.shuffle(indices)
    chunk = batch_size * CHUNK_BATCHES  # a multiple of batch_size: only the last chunk ends short
    batches: list[list[int]] = []
    for start in range(0, len(indices), chunk):
        part = sorted(indices[start : start + chunk], key=lambda i: lengths[i])
        batches += _cut(part, batch_size)
    short = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if short is not None:
        batches.append(short)
    return batches


def _cut(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def collate(seqs: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors `input_ids`, `attention_mask`, `target_mask`, each [B, Lmax].

    Padding is `pad_id` in `input_ids` and 0 in both masks.
    """
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    width = max(len(seq.input_ids) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq.input_ids)
        input_ids[row, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        target_mask[row, :n] = torch.tensor(seq.target_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}
