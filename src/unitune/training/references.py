"""Reference log-probs: computed once per dataset under no-grad and cached on disk.

With several processes each computes its share of the batches (`Shard`) and the shares are summed
across processes: every value is the one a single process computes, and one process writes the
file. The cache key joins the reference model's weight fingerprint and the tokenized data's
fingerprint (token ids and target masks, so the tokenizer, template and `max_length` are in it).
Every run that shares both reuses the file. Files are written to a temp name and renamed, so a
crash never leaves a truncated entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from unitune.core.io import atomic_write
from unitune.data import Items, Sequence, collate, data_fingerprint, length_batches

CACHE_VERSION = "1"

RefKey = tuple[str, str, str]  # (slot, split, input): ("pref", "train", "main" | "kl")


@dataclass
class RefStore:
    """A run's reference log-probs, one tensor per `(slot, split, input)`, with the cache entry
    each came from (named in checkpoints, so that a resumed run can find or recompute them)."""

    logps: dict[RefKey, torch.Tensor] = field(default_factory=dict)
    entries: dict[RefKey, str] = field(default_factory=dict)

    def get(self, slot: str, split: str, input: str = "main") -> torch.Tensor | None:
        return self.logps.get((slot, split, input))

    def __getitem__(self, key: RefKey) -> torch.Tensor:
        return self.logps[key]

    def put(self, key: RefKey, logps: torch.Tensor, entry: str) -> None:
        self.logps[key], self.entries[key] = logps, entry


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Shard:
    """This process's share of a pass over `n` batches, and the sum across processes that puts
    the shares together (`all_sum`, the identity for one process).

    Every process runs the same number of forwards, since FSDP and ZeRO-3 gather weights inside
    each one, collectively: a process with a batch fewer repeats batch 0 and drops the result.
    Results are placed in zeros and summed, and `x + 0 == x`, so the values are exactly the ones
    one process computes."""

    rank: int = 0
    world: int = 1
    all_sum: Callable[[torch.Tensor], torch.Tensor] = _identity

    def share(self, n: int) -> list[int | None]:
        """This process's batch indices; `None` is a repeat whose result is dropped."""
        per = -(-n // self.world)
        return [j if j < n else None for j in range(self.rank, per * self.world, self.world)]

    def agree(self, ok: bool) -> bool:
        """True on every process iff it is true on every process."""
        if self.world == 1:
            return ok
        return float(self.all_sum(torch.tensor([float(not ok)]))[0]) == 0


ONE = Shard()


def cache_key(model_fp: str, data_fp: str) -> str:
    raw = f"v{CACHE_VERSION}|{model_fp}|{data_fp}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


@torch.no_grad()
def compute_logps(
    logp_fn: nn.Module,
    seqs: list[Sequence],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    poll: Callable[[], None] | None = None,
    shard: Shard = ONE,
) -> torch.Tensor:
    """Summed response log-prob of every sequence, in input order ([N], fp32, on CPU), each
    process computing its `shard`. `poll` is called before every batch (it raises to stop the
    pass, e.g. on SIGTERM)."""
    out = torch.zeros(len(seqs), dtype=torch.float32)
    lengths = seqs.lengths().tolist() if isinstance(seqs, Items) else [len(s) for s in seqs]
    order = length_batches(lengths, batch_size, seed=0, shuffle=False)
    for j in shard.share(len(order)):
        if poll is not None:
            poll()
        idx = order[j if j is not None else 0]
        batch = {k: v.to(device) for k, v in collate([seqs[i] for i in idx], pad_id).items()}
        logp, _ = logp_fn(**batch)
        if j is not None:
            out[torch.tensor(idx)] = logp.float().cpu()
    return shard.all_sum(out)


def reference_logps(
    logp_fn: nn.Module,
    seqs: list[Sequence],
    *,
    model_fp: str,
    cache_dir: Path,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    only_cached: bool = False,
    poll: Callable[[], None] | None = None,
    shard: Shard = ONE,
) -> tuple[torch.Tensor | None, bool, str]:
    """Cached reference log-probs of `seqs` under the model `logp_fn` wraps; `(logps, hit, key)`
    with `key` the cache entry. With `only_cached`, a missing entry gives `(None, False, key)`.
    Processes use the cache only if it serves all of them (a node may not see another's disk);
    else each computes its `shard`, and process 0 writes the entry.

    The caller puts the model in reference mode (LoRA adapters disabled) before calling.
    """
    key = cache_key(model_fp, data_fingerprint(seqs))
    path = Path(cache_dir) / "refs" / f"{key}.safetensors"
    logps = load_file(str(path))["logp"] if path.exists() else None
    if shard.agree(logps is not None and logps.shape[0] == len(seqs)):
        return logps, True, key
    if only_cached:
        return None, False, key
    was_training = logp_fn.training
    logp_fn.eval()
    try:
        logps = compute_logps(
            logp_fn, seqs, pad_id=pad_id, batch_size=batch_size, device=device, poll=poll,
            shard=shard,
        )  # fmt: skip
    finally:
        logp_fn.train(was_training)
    if shard.rank != 0:
        return logps, False, key
    meta = {"model": model_fp, "n": str(len(seqs))}
    atomic_write(path, save({"logp": logps}, metadata=meta))
    return logps, False, key
