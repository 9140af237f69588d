"""The inputs of a merge, read one tensor at a time: safetensors checkpoints (one file or sharded),
full models and peft LoRA adapters, each giving the delta `d = theta - theta_base` of a tensor.

A source knows which base tensors it `touches`, lists its `problems` against the base
(architecture, names, shapes, dtypes, LoRA targets) before anything is written, and computes a
tensor's `delta` in float32 when asked.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unitune.core.io import ST_DTYPES
from unitune.merging.errors import MergeError
from unitune.models.source import model_dir, pickle_refusal

# config.json keys that must agree between the base and a full fine-tuned model
_ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
INDEX = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or sharded with an index).

    Only the headers are read up front; `get` reads one tensor, opening its file for just that
    read, so pages of earlier tensors are not kept mapped.
    """

    def __init__(self, files: list[Path], label: str) -> None:
        self.label = label
        self.files: dict[str, Path] = {}
        self.meta: dict[str, TensorMeta] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in self.files:
                        raise MergeError(f"{label}: tensor {key!r} is in two files")
                    sl = f.get_slice(key)
                    self.files[key] = file
                    self.meta[key] = TensorMeta(sl.get_dtype(), tuple(sl.get_shape()))

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def weight_files(path: Path, label: str) -> list[Path]:
    """The safetensors files of a model directory; pickle-only directories are refused."""
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    refusal = pickle_refusal(path)
    if refusal:
        raise MergeError(f"{label} ({path}) {refusal}")
    raise MergeError(f"{label} ({path}) has no model weights (*.safetensors)")


def read_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


class FullModel:
    """A full-weight model directory: the delta of a tensor is `theta - theta_base`."""

    kind = "full"

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = f"{label} ({path})"
        self.weights = Checkpoint(weight_files(path, label), self.label)
        self.config = read_config(path)

    def problems(self, base: FullModel) -> list[str]:
        out = []
        if self.config is not None and base.config is not None:
            for key in _ARCH_KEYS:
                mine, theirs = self.config.get(key), base.config.get(key)
                if mine != theirs:
                    out.append(
                        f"architecture mismatch: config.json {key} is {theirs!r} in "
                        f"{base.label} but {mine!r} in {self.label}"
                    )
        if out:
            return out  # the tensors of another architecture would only add noise
        bm, mm = base.weights.meta, self.weights.meta
        for name in sorted(set(bm) - set(mm)):
            out.append(f"tensor {name!r} is in {base.label} but missing from {self.label}")
        for name in sorted(set(mm) - set(bm)):
            out.append(f"tensor {name!r} is in {self.label} but not in {base.label}")
        for name in sorted(set(bm) & set(mm)):
            if bm[name].shape != mm[name].shape:
                out.append(
                    f"tensor {name!r}: shape {list(bm[name].shape)} in {base.label} but "
                    f"{list(mm[name].shape)} in {self.label}"
                )
            elif bm[name].dtype != mm[name].dtype:
                out.append(
                    f"tensor {name!r}: dtype {bm[name].dtype} in {base.label} but "
                    f"{mm[name].dtype} in {self.label}"
                )
        return out

    def touches(self, name: str) -> bool:
        return name in self.weights.meta

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        return _minus(self.weights.get(name), base)


@dataclass
class _LoraModule:
    a_key: str | None = None
    b_key: str | None = None
    embedding: bool = False


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A peft LoRA adapter directory: the delta of `<module>.weight` is `scaling * B @ A`.

    `scaling` is `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), with `rank_pattern`
    and `alpha_pattern` honoured per module; the product is transposed for `fan_in_fan_out` and
    for embeddings, as peft's `merge_and_unload` does. Tensors in `modules_to_save` are full
    replacement weights: their delta is `tensor - theta_base`. Adapter dtypes are not checked
    against the base (the delta is computed in float32 either way).
    """

    kind = "lora"

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = f"{label} ({path})"
        cfg = json.loads((path / "adapter_config.json").read_text())
        self.config = cfg
        peft_type = cfg.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise MergeError(f"{self.label}: peft type {peft_type} is not supported, only LoRA")
        unsupported = {
            "use_dora": "DoRA adapters (use_dora: true)",
            "lora_bias": "LoRA bias (lora_bias: true)",
            "target_parameters": "target_parameters",
            "layer_replication": "layer_replication",
            "trainable_token_indices": "trainable_token_indices",
        }
        for key, what in unsupported.items():
            if cfg.get(key):
                raise MergeError(f"{self.label}: {what} cannot be merged; only plain LoRA")
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            weight_files(path, label)  # raises the pickle-only error if that is the case
            raise MergeError(f"{self.label} has no adapter_model.safetensors")
        self.weights = Checkpoint([file], self.label)
        self.modules: dict[str, _LoraModule] = {}
        self.full: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save)
        for key in self.weights.meta:
            self._add_key(key)
        self.targets: dict[str, str] = {f"{m}.weight": m for m in self.modules}

    def _add_key(self, key: str) -> None:
        name = key.removeprefix(_PEFT_PREFIX)
        suffixes = {
            ".lora_A.weight": ("a_key", False),
            ".lora_B.weight": ("b_key", False),
            ".lora_embedding_A": ("a_key", True),
            ".lora_embedding_B": ("b_key", True),
        }
        for suffix, (slot, embedding) in suffixes.items():
            if name.endswith(suffix):
                module = self.modules.setdefault(name[: -len(suffix)], _LoraModule())
                setattr(module, slot, key)
                module.embedding = embedding
                return
        if "lora_" in name or "magnitude_vector" in name or "token_adapter" in name:
            raise MergeError(f"{self.label}: adapter tensor {key!r} is not plain LoRA")
        self.full[name.replace(".modules_to_save.", ".")] = key

    def _scaling(self, module: str, rank: int) -> float:
        cfg = self.config
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        if r != rank:
            raise MergeError(
                f"{self.label}: module {module!r} has rank {rank} but the config says r={r}"
            )
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _delta_shape(self, mod: _LoraModule) -> tuple[tuple[int, ...], int, int]:
        a = self.weights.meta[mod.a_key].shape
        b = self.weights.meta[mod.b_key].shape
        shape = (b[0], a[1])
        if mod.embedding or self.config.get("fan_in_fan_out"):
            shape = shape[::-1]
        return shape, a[0], b[1]

    def problems(self, base: FullModel) -> list[str]:
        out = []
        bm = base.weights.meta
        for module, mod in sorted(self.modules.items()):
            weight = f"{module}.weight"
            if mod.a_key is None or mod.b_key is None:
                out.append(f"{self.label}: module {module!r} has only one of LoRA A and B")
                continue
            if weight not in bm:
                out.append(
                    f"LoRA in {self.label} targets {module!r}, but tensor {weight!r} is not "
                    f"in {base.label}"
                )
                continue
            shape, r_a, r_b = self._delta_shape(mod)
            if r_a != r_b or shape != bm[weight].shape:
                out.append(
                    f"tensor {weight!r}: shape {list(bm[weight].shape)} in {base.label} but "
                    f"the LoRA product in {self.label} has shape {list(shape)} (A "
                    f"{list(self.weights.meta[mod.a_key].shape)}, B "
                    f"{list(self.weights.meta[mod.b_key].shape)})"
                )
                continue
            try:
                self._scaling(module, r_a)
            except MergeError as e:
                out.append(str(e))
        for name, key in sorted(self.full.items()):
            if name not in bm:
                out.append(f"tensor {name!r} is in {self.label} but not in {base.label}")
            elif bm[name].shape != self.weights.meta[key].shape:
                out.append(
                    f"tensor {name!r}: shape {list(bm[name].shape)} in {base.label} but "
                    f"{list(self.weights.meta[key].shape)} in {self.label}"
                )
            elif name in self.targets:
                out.append(f"tensor {name!r} is both LoRA-adapted and saved whole in {self.label}")
        return out

    def touches(self, name: str) -> bool:
        return name in self.targets or name in self.full

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        if name in self.full:
            return _minus(self.weights.get(self.full[name]), base)
        module = self.targets.get(name)
        if module is None:
            return None
        mod = self.modules[module]
        a = self.weights.get(mod.a_key).float()
        b = self.weights.get(mod.b_key).float()
        d = (b @ a) * self._scaling(module, a.shape[0])
        return d.T.contiguous() if mod.embedding or self.config.get("fan_in_fan_out") else d


Source = FullModel | LoraAdapter


def _minus(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`tensor - base` in float32, in place when `tensor` was just read as float32."""
    return tensor.sub_(base) if tensor.dtype == torch.float32 else tensor.float() - base


def open_source(path: Path, label: str) -> Source:
    """A model directory as a full model or, with `adapter_config.json`, a LoRA adapter."""
    if not path.is_dir():
        raise MergeError(f"{label} ({path}) is not a directory")
    if (path / "adapter_config.json").is_file():
        return LoraAdapter(path, label)
    return FullModel(path, label)


def open_base(name: str, revision: str | None) -> FullModel:
    path = model_dir(name, revision)
    if (path / "adapter_config.json").is_file():
        raise MergeError(f"base ({path}) is a LoRA adapter; the base must be a full model")
    base = FullModel(path, "base")
    if base.config is None:
        raise MergeError(f"base ({path}) has no config.json")
    return base


def stored_dtypes(path: str | Path) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors stored in a model directory (headers only)."""
    path = Path(path)
    weights = Checkpoint(weight_files(path, str(path)), str(path))
    dtypes = {ST_DTYPES[m.dtype] for m in weights.meta.values()}
    return {d for d in dtypes if d.is_floating_point}
