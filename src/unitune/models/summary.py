"""What a model trains and how the CLI describes it."""

from __future__ import annotations

from typing import Any

import torch

from unitune.models.lora import is_peft


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or only the adapters with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def describe(model: Any) -> str:
    """One line for the CLI: class, parameter counts and dtype (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    base = model.get_base_model() if is_peft(model) else model
    dtype = str(base.dtype).removeprefix("torch.")
    text = (
        f"{type(base).__name__}: {_count(total)} params, {_count(trainable)} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), {dtype}"
    )
    if is_peft(model):
        cfg = model.peft_config[model.active_adapter]
        modules = ", ".join(sorted(cfg.target_modules))
        text += f", LoRA r={cfg.r} alpha={cfg.lora_alpha} on {modules}"
    return text


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
