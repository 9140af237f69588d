"""LoRA: wrapping a model in PEFT adapters, and the reference policy as the same model with its
adapters disabled.

The default `target_modules` is PEFT's `all-linear`: every `nn.Linear` (and Conv1D) of the
decoder except the LM head, on any architecture (docs/methods.md, "LoRA targets"). A list of
names that matches no linear module is a one-line `ModelLoadError` listing the model's linear
module names, raised before PEFT would fail with a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from unitune.models.errors import ModelLoadError

if TYPE_CHECKING:
    from unitune.models.config import LoraConfig

ALL_LINEAR = "all-linear"


def is_peft(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` (LoRA)."""
    # peft is imported lazily; if it was never imported, `model` cannot be a PeftModel.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's "linear" layers

    return isinstance(module, (nn.Linear, Conv1D))


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers, the LM head excluded:
    what `target_modules` may name (e.g. `q_proj`, `query_key_value`, `c_attn`)."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if _is_linear(module) and module is not head
    }
    return sorted(names)


def check_target_modules(model: nn.Module, target_modules: str | list[str]) -> None:
    """Raise a one-line `ModelLoadError` unless every name in `target_modules` (a list) is the
    last name component of one of the model's linear layers; `all-linear` always matches."""
    if target_modules == ALL_LINEAR:
        if not linear_module_names(model):
            raise ModelLoadError(
                f"model.lora.target_modules: {type(model).__name__} has no linear layers "
                "besides its LM head"
            )
        return
    available = linear_module_names(model)
    missing = [name for name in target_modules if name not in available]
    if missing:
        raise ModelLoadError(
            f"model.lora.target_modules: {', '.join(missing)} match no linear layer of "
            f"{type(model).__name__}; its linear layers are {', '.join(available)} "
            f"(or use {ALL_LINEAR!r})"
        )


def add_lora(model: nn.Module, lora: LoraConfig) -> Any:
    """`model` wrapped in fresh LoRA adapters (a `PeftModel`); only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_target_modules(model, lora.target_modules)
    targets = lora.target_modules
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft probes a transformers attribute that transformers 5 deprecates; not actionable.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, config)


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[Any]:
    """Run the reference policy inside this block.

    With LoRA the reference is the frozen base, i.e. the same model with its adapters disabled,
    so no second copy of the weights is needed. With full fine-tuning this is a no-op: the
    reference log-probs come from a cache computed before training (see `refcache`).
    """
    if is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is one of PEFT's LoRA layers (a base layer with adapters)."""
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")


def merged_weight(layer: nn.Module) -> Tensor:
    """A LoRA layer's weight with its active adapters added, in float32, out of place (the
    layer is not touched: PEFT's `merge_adapter` / `unmerge_adapter` would round the base
    weight twice)."""
    w = layer.get_base_layer().weight.detach().float()
    if not getattr(layer, "disable_adapters", False):
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}):
                w = w + layer.get_delta_weight(adapter).float()
    return w


def merged_weights(model: nn.Module, *, aliases: bool = False) -> Iterator[tuple[str, Tensor]]:
    """The model's weights under the names its checkpoint gives them (`save_pretrained` of
    the base model: `model.layers.0.self_attn.q_proj.weight`, ...), one at a time, with LoRA
    merged (`merged_weight`) and PEFT's own names gone (`base_model.model.`, `base_layer`,
    `lora_A/B`); a `modules_to_save` copy stands for its module. A weight shared by several
    modules (tied embeddings) comes once, under its first name, unless `aliases`. Parameters
    only, detached; what a checkpoint loader (vLLM's `load_weights`) or a copy of the model
    (`GenerationCopy.refresh`) reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
        if is_lora_layer(module):
            yield f"{prefix}weight", merged_weight(module)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield f"{prefix}bias", bias.detach()
            return
        saved = getattr(module, "modules_to_save", None)
        if saved is not None and hasattr(module, "original_module"):
            name = getattr(module, "active_adapter", None)
            name = name[0] if isinstance(name, list) else name
            off = getattr(module, "disable_adapters", False)
            module = saved[name] if name in saved and not off else module.original_module
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen and not aliases:
                continue
            seen.add(id(p))
            yield f"{prefix}{name}", p.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(base, "")
