"""Saving a model (or its LoRA adapter) and tokenizer as safetensors, atomically."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from unitune.core.io import atomic_dir
from unitune.core.progress import transformers_bars_off
from unitune.models.lora import is_peft


def save_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    merge_lora: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the model (or LoRA adapter) and tokenizer to `out_dir` as safetensors; return it.

    A `PeftModel` is saved as its adapter (`adapter_config.json` + `adapter_model.safetensors`,
    load with peft onto the same base); with `merge_lora=True` the adapters are merged into a
    copy of the model, which is saved as a full model that plain transformers loads. Merging a
    copy (rather than merge + unmerge in place) leaves the training model bit-for-bit unchanged,
    so its reference weights and fingerprint stay valid; it costs one temporary copy of the weights.

    `state_dict` (the model's, gathered from the processes of a sharding engine) is saved instead
    of the weights `model` holds.

    Written through `atomic_dir`: a crash never leaves a half-written `out_dir`.
    """
    given = {} if state_dict is None else {"state_dict": state_dict}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if is_peft(model) and merge_lora:
            to_save = copy.deepcopy(model).merge_and_unload()
        else:
            to_save = model
        with _inference_config(to_save), transformers_bars_off():
            if is_peft(to_save):
                # unitune never resizes the vocabulary, so the base embeddings need not be saved;
                # peft's "auto" would look the base model up on the hub to find out.
                to_save.save_pretrained(str(tmp), save_embedding_layers=False, **given)
            else:
                to_save.save_pretrained(str(tmp), **given)
        del to_save
        tokenizer.save_pretrained(str(tmp))
    return out_dir


@contextlib.contextmanager
def _inference_config(model: Any) -> Iterator[None]:
    """Saved models are for inference: write `use_cache: true` without changing the live model."""
    config = model.get_base_model().config if is_peft(model) else model.config
    saved = config.use_cache
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = saved
