"""PAFT's L1 penalty (arXiv 2406.17923): `sum |theta - theta_base|` over the trained weights."""

from __future__ import annotations

from typing import Any

import torch


class DeltaL1:
    """`sum |theta - theta_base|` over the trained weights, for PAFT's L1 penalty.

    Full fine-tuning: against a copy of the starting values of the trainable parameters, taken at
    construction (one extra copy of those weights; build it once the model is on its device and
    in its dtype). A parameter moved or cast later has its copy moved or cast with it on the next
    call, so `p - p0` never mixes devices and the start is the start as trained. LoRA: the delta
    of each adapted weight is the LoRA product `scaling * B @ A` itself, so no copy is kept.
    """

    def __init__(self, model: Any):
        self.lora: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.full: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        lora_params: set[int] = set()
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "scaling"):
                for name, a in module.lora_A.items():
                    b = module.lora_B[name]
                    self.lora.append((a.weight, b.weight, float(module.scaling[name])))
                    lora_params |= {id(a.weight), id(b.weight)}
        for p in model.parameters():
            if p.requires_grad and id(p) not in lora_params:
                self.full.append((p, p.detach().clone()))  # e.g. modules_to_save, full weights

    def __call__(self) -> torch.Tensor:
        for i, (p, p0) in enumerate(self.full):
            if p0.device != p.device or p0.dtype != p.dtype:
                self.full[i] = (p, p0.to(device=p.device, dtype=p.dtype))
        terms = [(p - p0).abs().sum() for p, p0 in self.full]
        terms += [abs(s) * (b @ a).abs().sum() for a, b, s in self.lora]
        return torch.stack(terms).sum()
