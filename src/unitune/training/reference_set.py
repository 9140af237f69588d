"""A run's reference log-probs: which sequences need them, their fingerprints and cache entries.

`References(session)` computes (or loads from the cache, `references.py`) the starting model's
log-probs of every training set whose objective needs a reference, of the objectives' auxiliary
inputs, and of every held-out set (the metrics' fixed starting reference). `switch(module)` makes
the current model the training reference (sequential's preference stage); `load_switched` finds a
resumed run's switched reference in the cache.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from unitune.models.lora import reference_mode
from unitune.training.batches import flatten
from unitune.training.references import RefKey, RefStore, reference_logps
from unitune.training.session import Session


class References:
    """The reference log-probs, one tensor per `(slot, split, input)`, with their cache entries;
    built with the starting model's (LoRA: adapters disabled)."""

    def __init__(self, session: Session):
        self.session = session
        self.store = RefStore()
        self.compute(session.logps, initial=True)

    def get(self, slot: str, split: str, input: str = "main") -> torch.Tensor | None:
        return self.store.get(slot, split, input)

    def __getitem__(self, key: RefKey) -> torch.Tensor:
        return self.store[key]

    def __contains__(self, key: RefKey) -> bool:
        return key in self.store.logps

    @property
    def entries(self) -> dict[str, str]:
        """The cache entries in use, by `slot/split/input` (named in every checkpoint)."""
        return {"/".join(key): entry for key, entry in self.store.entries.items()}

    def switch(self, module: nn.Module) -> str:
        """The current model (adapters included) becomes the training reference; returns its
        fingerprint."""
        fp = self.compute(module, initial=False)
        assert fp is not None
        return fp

    def load_switched(self, module: nn.Module, model_fp: str) -> bool:
        """A resumed run's switched reference `model_fp`, from the cache only: False when an
        entry is missing (nothing is computed)."""
        return self.compute(module, initial=False, model_fp=model_fp) is not None

    def compute(
        self, module: nn.Module, *, initial: bool, model_fp: str | None = None
    ) -> str | None:
        """Reference log-probs into the store: for the training sets whose objective needs them;
        on the initial call also for the eval sets. Returns the reference's fingerprint; given a
        `model_fp`, entries are only looked up in the cache and None is returned when one is
        missing."""
        s = self.session
        # the precision is part of the key: bf16 log-probs differ from fp32 ones
        fp = model_fp or f"{s.fingerprint(module, adapters=not initial)}|{s.acc.mixed_precision}"
        wanted = [
            ((slot, "train", "main"), split.train)
            for slot, (obj, _, split) in s.objectives.items()
            if obj.needs_ref and split.kind != "prompts"  # online: scored live (online.py)
        ]
        splits = ("train", "eval") if initial else ("train",)
        wanted += [(key, aux.seqs) for key, aux in s.aux.items() if key[1] in splits]
        if initial:
            wanted += [
                ((k, "eval", "main"), split.eval)
                for k, split in s.data.items()
                if split.kind != "prompts"
            ]
        ref_ctx = reference_mode(s.model) if initial else nullcontext()
        # each process computes its share of the batches (`s.shard`), process 0 writes
        with ref_ctx, s.acc.autocast():
            for key, items in wanted:
                logps, hit, entry = reference_logps(
                    module,
                    flatten(items),
                    model_fp=fp,
                    cache_dir=s.cache_dir,
                    pad_id=s.pad_id,
                    batch_size=s.cfg.train.eval_batch_size,
                    device=s.device,
                    only_cached=model_fp is not None,
                    poll=s.poll,
                    shard=s.shard,
                )
                if logps is None:
                    return None
                self.store.put(key, logps, entry)
                s.console.log(
                    f"reference log-probs {'/'.join(key)}: {'cache hit' if hit else 'computed'}"
                    f" ({len(items)} items)"
                )
        return fp
