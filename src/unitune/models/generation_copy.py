"""The model copy unitune generates with on a CPU: the policy's weights in the precision the run
computes in, LoRA merged, each linear layer's weight packed once for the CPU's GEMM kernels.

A decoding step multiplies a handful of rows by every weight of the model, so it is bound by
reading weights, and on a CPU the matmul kernels re-lay each weight out for their blocked
format on every call. Packing it once (oneDNN's `_reorder_linear_weight` for bfloat16, MKL's
`_mkl_reorder_linear_weight` for float32: what `torch.compile` does on a CPU with weight
freezing) and keeping bfloat16 weights as bfloat16 (autocast casts every weight at every call)
take that work out of the loop (README, "Generation").

`GenerationCopy(model, dtype)` deep-copies the model once (a PEFT model: its base with the
adapters merged); `refresh(model)` copies the policy's current weights into it and packs them
again: the online trainer refreshes before every generation batch, so the copy is never stale,
and `release()`s the packed weights after it, so that they take no memory while the policy
trains (the copy keeps only what is not a packed linear layer: embeddings, norms).
Where the kernels are not there (a torch built without oneDNN or MKL, a GPU) the linear layers
stay as they are and only the precision changes.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from unitune.models.lora import merged_weights


def _pack_kind(dtype: torch.dtype) -> str | None:
    """Which packed kernel runs `dtype` on this CPU, or None."""
    if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        return "mkldnn" if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        return "mkl" if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") else None
    return None


class PackedLinear(nn.Module):
    """An `nn.Linear` for inference whose weight is held only packed for the CPU kernels.
    `pack(weight)` packs a new weight (any dtype: cast to the layer's); `release()` frees it
    until the next `pack` (between generations, the memory goes back to training)."""

    ROWS = 16  # the kernels' hint for the number of rows of a call (a decoding batch)

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.kind = kind
        self.dtype = linear.weight.dtype
        self.packed: Tensor | None = None
        self.plain: Tensor | None = None  # MKL's packed GEMM also reads the plain weight
        self.pack(linear.weight)

    @torch.no_grad()
    def pack(self, weight: Tensor) -> None:
        w = weight.detach().to(device="cpu", dtype=self.dtype)
        if self.kind == "mkldnn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self.ROWS)
        else:
            self.plain = w.contiguous()
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.plain, self.ROWS)

    def release(self) -> None:
        self.packed = self.plain = None

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is None:
            raise RuntimeError("this generation copy was released: refresh() it first")
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.dtype)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if self.kind == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        else:
            y = torch.ops.mkl._mkl_linear(rows, self.packed, self.plain, self.bias, self.ROWS)
        return y.reshape(*shape[:-1], self.out_features)


class GenerationCopy:
    """A copy of `model` in `dtype` for decoding (see the module docstring); `.module` is the
    copy, in eval mode, no gradients."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, *, pack: bool = True) -> None:
        if hasattr(model, "merge_and_unload"):  # PEFT: its base with the adapters merged
            module = copy.deepcopy(model).merge_and_unload()
        else:
            module = copy.deepcopy(model)
        module.to(dtype=dtype).eval().requires_grad_(False)
        if getattr(module.config, "use_cache", True) is False:
            module.config.use_cache = True
        self.kind = _pack_kind(dtype) if pack else None
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        self.packed: list[PackedLinear] = []
        if self.kind is not None and on_cpu:
            self._pack(module)
        self.module = module

    def _pack(self, module: nn.Module) -> None:
        for name, child in list(module.named_modules()):
            if type(child) is not nn.Linear:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            try:
                packed = PackedLinear(child, self.kind)
            except RuntimeError:  # a shape or layout the kernels refuse: leave it plain
                continue
            setattr(parent, attr, packed)
            self.packed.append(packed)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Copy `model`'s current weights (LoRA merged: `lora.merged_weights`) and buffers into
        the copy and pack them."""
        done: set[int] = set()
        for name, w in merged_weights(model, aliases=True):
            owner, _, attr = name.rpartition(".")
            mod = self.module.get_submodule(owner) if owner else self.module
            if attr == "weight" and isinstance(mod, PackedLinear):
                mod.pack(w)
            else:
                self._put(getattr(mod, attr), w, done)
        source = model.get_base_model() if hasattr(model, "get_base_model") else model
        own = dict(self.module.named_buffers())
        for name, b in source.named_buffers():
            mine = own.get(name.replace(".base_layer.", "."))
            if mine is not None and mine.shape == b.shape:
                mine.copy_(b)

    def release(self) -> None:
        """Free the packed weights until the next `refresh`."""
        for p in self.packed:
            p.release()

    @staticmethod
    def _put(target: Tensor, value: Tensor, done: set[int]) -> None:
        if id(target) in done:  # a tied weight, copied once
            return
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        done.add(id(target))


def generation_dtype(model: nn.Module, setting: str, mixed_precision: str = "no") -> torch.dtype:
    """The dtype to generate in: `setting` "float32" / "bfloat16" as said; "auto": bfloat16
    where the run computes in it (mixed precision "bf16", or bfloat16 weights), else the
    model's own dtype."""
    if setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    own = next(model.parameters()).dtype
    return torch.bfloat16 if mixed_precision == "bf16" else own
