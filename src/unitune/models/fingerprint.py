"""Fingerprints of weights: a sha256 that keys cached reference log-probs and checks that a
resumed run has the weights it expects."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from unitune.models.lora import is_peft


def _adapter_param_ids(model: Any) -> set[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                sub = getattr(module, attr, None)
                if isinstance(sub, torch.nn.Module):
                    ids.update(id(p) for p in sub.parameters())
                elif isinstance(sub, (dict, torch.nn.ParameterDict)):
                    ids.update(id(p) for p in sub.values())
    return ids


def _reference_parameters(model: Any, adapters: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The named weights that define the reference policy, under base-model names."""
    if not is_peft(model) or adapters:
        return list(model.named_parameters())
    skip = _adapter_param_ids(model)
    out = []
    for name, param in model.named_parameters():
        if id(param) in skip:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out.append((name, param))
    return out


def model_fingerprint(model: Any, *, adapters: bool = False) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the weights that define the reference.

    Used to key cached reference log-probs: the same weights give the same hash in any process,
    and changing any weight changes it. For a `PeftModel` only the base weights count, under
    their base-model names: the adapters start as a zero delta and the reference is the model
    with adapters disabled, so a LoRA model hashes like its plain base model. Buffers (e.g. rotary
    frequencies) are derived from the config and are not hashed.

    `adapters=True` hashes a LoRA model as it is, adapters included: the reference when the
    current (adapted) model becomes the reference, as in sequential's preference stage.
    """
    return weights_fingerprint(_reference_parameters(model, adapters))


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of named tensors, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(named, key=lambda item: item[0]):
        t = param.detach()
        header = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n"
        digest.update(header.encode())
        # Viewing as bytes works for every dtype, including bfloat16 which numpy lacks.
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()
