"""`unitune merge`: a base and N fine-tuned models (or LoRA adapters) into one HF model directory.

The methods are those of docs/methods.md, "Merging", on the deltas `d_i = theta_i - theta_base`:
task arithmetic, TIES and DARE (see `combine`). The merge streams: tensors are read one at a time
from the safetensors files of the base and of each model, merged, and written straight into the
output's safetensors files, whose headers are known up front from the base's metadata. Peak memory
is therefore a few tensors (the largest one, once per model), not N models.

Everything is validated before anything is written, and the output directory is written through
`atomic_dir`: it appears only once the merge has fully succeeded.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open

from unitune.config import MergeConfig, MergeOptions
from unitune.models.load import atomic_dir, model_dir, pickle_refusal


class MergeError(ValueError):
    """The inputs cannot be merged; the message names the tensor and the sources involved."""


# safetensors' dtype names
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

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
# files copied from the base to the output, besides the weights
_COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.model",
    "vocab.*",
    "merges.txt",
)
_INDEX = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# The methods, on one tensor


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    opts: MergeOptions,
    *,
    densities: list[float] | None = None,
    name: str = "",
) -> torch.Tensor:
    """Merge one tensor's deltas `d_i = theta_i - theta_base` into one delta (float32).

    - `task_arithmetic` (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
      `sum_i w_i d_i`.
    - `ties` (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708): trim each delta to its
      top `density` fraction by magnitude (`densities[i]` overrides `opts.density`), weight
      `u_i = w_i * trimmed d_i`, elect each entry's sign as `sign(sum_i u_i)`, then take the
      disjoint mean of the nonzero `u_i` that agree with it: divided by their count
      (`normalize="count"`, the paper) or by the sum of their weights (`normalize="weight"`,
      mergekit's `normalize: true`). Entries with no agreeing value (including a zero sum) get 0.
    - `dare_linear` / `dare_ties` (Yu et al. 2024, "Language Models are Super Mario",
      arXiv 2311.03099): drop each delta entry with probability `drop_rate` and rescale the
      survivors by `1 / (1 - drop_rate)` (`dare_drop`, seeded by `opts.seed`, `name` and the
      model's index, so reproducible and independent of tensor order), then combine by task
      arithmetic (`dare_linear`) or by TIES's sign election and disjoint mean without
      magnitude trimming (`dare_ties`).

    Precision: deltas and the result are float32. A difference of two bfloat16 or float16
    values is exact in float32 unless their magnitudes are more than ~2^15 apart, so a merge that
    reproduces a source (weights (1, 0), say) gives it back bit for bit except at such entries,
    where it errs by at most ~2^-22 * (|theta| + |theta_base|) (see test_parallel's bf16 test).

    A pure function: the inputs are not modified.
    """
    return _combine([d.float() for d in deltas], weights, opts, densities=densities, name=name)


def _combine(
    ds: list[torch.Tensor],
    weights: list[float],
    opts: MergeOptions,
    *,
    densities: list[float] | None = None,
    name: str = "",
) -> torch.Tensor:
    """`combine` on a list of float32 deltas that it owns: each entry is replaced by its trimmed
    or dropped version as it goes (no tensor is modified in place), so a caller that holds no
    other reference to a delta has it freed as soon as its replacement exists."""
    if not ds or len(ds) != len(weights):
        raise ValueError(f"combine: {len(ds)} deltas but {len(weights)} weights")
    if densities is not None and len(densities) != len(ds):
        raise ValueError(f"combine: {len(ds)} deltas but {len(densities)} densities")
    for i in range(len(ds)):
        if opts.method in ("dare_linear", "dare_ties"):
            ds[i] = dare_drop(ds[i], opts.drop_rate, seed=opts.seed, name=name, index=i)
        elif opts.method == "ties":
            ds[i] = trim(ds[i], densities[i] if densities is not None else opts.density)

    if opts.method in ("task_arithmetic", "dare_linear"):
        out = torch.zeros_like(ds[0])
        for w, d in zip(weights, ds, strict=True):
            out.add_(d, alpha=w)
        return out
    return _disjoint_mean(ds, weights, opts.normalize)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the `max(1, int(density * numel))` entries largest in magnitude.

    Entries of equal magnitude at the cut are kept lowest index first.
    """
    n = delta.numel()
    k = max(1, int(density * n))
    if density >= 1.0 or k >= n:
        return delta
    a = delta.abs().reshape(-1)
    cut = a.kthvalue(n - k + 1).values  # the k-th largest magnitude
    keep = a > cut
    missing = k - int(keep.sum())
    if missing > 0:  # entries equal to the cut fill the remaining places
        keep[(a == cut).nonzero().flatten()[:missing]] = True
    del a
    return delta * keep.view_as(delta)


def dare_mask(
    shape: torch.Size | tuple[int, ...], drop_rate: float, *, seed: int, name: str, index: int
) -> torch.Tensor:
    """DARE's keep mask (bool, True = kept with probability `1 - drop_rate`).

    Drawn from a `torch.Generator` seeded by a sha256 of (`seed`, `name`, `index`), so the same
    tensor of the same model always gets the same mask, whatever order the tensors come in.
    """
    key = f"{seed}\x00{name}\x00{index}".encode()
    gen = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    )
    return torch.rand(tuple(shape), generator=gen) >= drop_rate


def dare_drop(
    delta: torch.Tensor, drop_rate: float, *, seed: int, name: str, index: int
) -> torch.Tensor:
    """DARE: zero each entry with probability `drop_rate`, scale the rest by `1/(1-drop_rate)`."""
    if drop_rate == 0.0:
        return delta
    keep = dare_mask(delta.shape, drop_rate, seed=seed, name=name, index=index)
    return (delta * keep).div_(1.0 - drop_rate)


def _disjoint_mean(ds: list[torch.Tensor], weights: list[float], normalize: str) -> torch.Tensor:
    """TIES's sign election and disjoint mean over the weighted deltas `u_i = w_i d_i`."""
    total = torch.zeros_like(ds[0])
    for w, d in zip(weights, ds, strict=True):
        total.add_(d, alpha=w)
    positive, negative = total > 0, total < 0  # the elected sign; neither where the sum is 0
    num = total.zero_()
    den = torch.zeros_like(num)
    for w, d in zip(weights, ds, strict=True):
        u = d * w
        agree = ((u > 0) & positive) | ((u < 0) & negative)
        num.add_(u.mul_(agree))
        den.add_(agree, alpha=1.0 if normalize == "count" else w)
        del u, agree
    den[den == 0] = 1.0  # no agreeing value: num is 0 (weights summing to 0: as mergekit)
    return num.div_(den)


# --------------------------------------------------------------------------------------------
# Reading: safetensors checkpoints, full models and LoRA adapters


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


def _weight_files(path: Path, label: str) -> list[Path]:
    """The safetensors files of a model directory; pickle-only directories are refused."""
    index = path / _INDEX
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


def _read_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


class FullModel:
    """A full-weight model directory: the delta of a tensor is `theta - theta_base`."""

    kind = "full"

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = f"{label} ({path})"
        self.weights = Checkpoint(_weight_files(path, label), self.label)
        self.config = _read_config(path)

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
            _weight_files(path, label)  # raises the pickle-only error if that is the case
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


def _open_base(name: str, revision: str | None) -> FullModel:
    path = model_dir(name, revision)
    if (path / "adapter_config.json").is_file():
        raise MergeError(f"base ({path}) is a LoRA adapter; the base must be a full model")
    base = FullModel(path, "base")
    if base.config is None:
        raise MergeError(f"base ({path}) has no config.json")
    return base


# --------------------------------------------------------------------------------------------
# Sparsity of a delta


class DeltaStats:
    """Streaming sparsity figures of one model's delta, fed one tensor at a time.

    `top10_mass` (the fraction of the L1 mass held by the largest 10% of entries) needs a global
    threshold, which one streaming pass cannot know exactly without keeping 10% of the entries.
    It comes instead from a histogram of |d| with 2^19 bins keyed by the top bits of the float32
    pattern (monotone in |d|; a bin spans a relative width of 2^-11), each entry counted at its
    bin's midpoint: the figure is within 2^-12 (0.025%) of the exact one. `l1`, `zeros` and
    `sparsity` are exact.
    """

    _SHIFT = 12
    _BINS = 1 << (31 - _SHIFT)
    _CHUNK = 1 << 22

    def __init__(self, tol: float = 1e-6) -> None:
        self.tol = tol
        self.numel = 0
        self.zeros = 0
        self.l1 = 0.0
        self.counts = torch.zeros(self._BINS, dtype=torch.int64)

    def update(self, delta: torch.Tensor | None, numel: int) -> None:
        """Add one tensor's delta (`None`: all `numel` entries are zero)."""
        self.numel += numel
        if delta is None:
            self.zeros += numel
            return
        flat = delta.float().reshape(-1)
        for start in range(0, flat.numel(), self._CHUNK):
            a = flat[start : start + self._CHUNK].abs()
            self.zeros += int(torch.count_nonzero(a <= self.tol))
            self.l1 += float(a.sum(dtype=torch.float64))
            self.counts += torch.bincount(a.view(torch.int32) >> self._SHIFT, minlength=self._BINS)

    def top_mass(self, fraction: float = 0.1) -> float:
        """Fraction of the L1 mass in the largest `fraction` of entries (see the class doc)."""
        if self.l1 <= 0.0:
            return 0.0
        k = math.ceil(fraction * self.numel)
        bins = torch.nonzero(self.counts).flatten().flip(0)  # occupied bins, largest |d| first
        counts = self.counts[bins]
        lo = (bins << self._SHIFT).to(torch.int32).view(torch.float32).double()
        hi = (((bins + 1) << self._SHIFT) - 1).to(torch.int32).view(torch.float32).double()
        mid = (lo + hi) / 2
        cum = counts.cumsum(0)
        if k >= int(cum[-1]):  # the top fraction holds every nonzero entry
            return 1.0
        b = int(torch.searchsorted(cum, k))  # the bin holding the k-th largest entry
        above = int(cum[b - 1]) if b > 0 else 0
        top = float((counts[:b] * mid[:b]).sum()) + (k - above) * float(mid[b])
        return min(1.0, top / self.l1)

    def report(self) -> dict[str, Any]:
        return {
            "numel": self.numel,
            "zeros": self.zeros,
            "sparsity": self.zeros / self.numel if self.numel else 0.0,
            "l1": self.l1,
            "top10_mass": self.top_mass(0.1),
        }


def delta_sparsity(base: str | Path, model: str | Path, tol: float = 1e-6) -> dict[str, Any]:
    """Sparsity figures of `model - base`, streamed one tensor at a time.

    Returns `numel` (floating-point entries of the base), `zeros` (entries with |d| <= tol),
    `sparsity` (zeros / numel), `l1` (sum |d|) and `top10_mass` (fraction of the L1 mass held
    by the largest 10% of entries; see `DeltaStats` for its tiny histogram approximation).
    `model` may be a full model or a LoRA adapter (whose delta is its LoRA product; tensors it
    does not touch count as zeros). Both are resolved with `unitune.models.load.model_dir`.
    """
    b = _open_base(str(base), None)
    m = open_source(model_dir(str(model)), "model")
    problems = m.problems(b)
    if problems:
        raise MergeError("cannot compare:\n  " + "\n  ".join(problems))
    stats = DeltaStats(tol)
    for name, meta in b.weights.meta.items():
        if not _ST_DTYPES[meta.dtype].is_floating_point:
            continue
        numel = math.prod(meta.shape)
        if m.touches(name):
            stats.update(m.delta(name, b.weights.get(name).float()), numel)
        else:
            stats.update(None, numel)
    return stats.report()


# --------------------------------------------------------------------------------------------
# Writing safetensors, one tensor at a time


@dataclass(frozen=True)
class _OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.dtype].itemsize


def _header(entries: list[_OutTensor]) -> bytes:
    """The safetensors header: u64 length, then JSON padded with spaces to a multiple of 8."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        meta[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset]}
        offset += e.nbytes
        meta[e.name]["data_offsets"][1] = offset
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path, entries: list[_OutTensor], tensor: Callable[[_OutTensor], torch.Tensor]
) -> int:
    """Write a safetensors file whose tensors `tensor(entry)` computes one at a time.

    The header is written first from `entries`; each computed tensor must match its entry's
    dtype and shape. Returns the file's size in bytes.
    """
    header = _header(entries)
    with open(path, "wb") as fh:
        fh.write(header)
        for e in entries:
            t = tensor(e)
            if _ST_NAMES.get(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"{e.name}: computed {t.dtype} {list(t.shape)}, expected {e}")
            if t.numel():
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        size = fh.tell()
    expected = len(header) + sum(e.nbytes for e in entries)
    if size != expected:
        raise RuntimeError(f"{path}: wrote {size} bytes, expected {expected}")
    return size


def _shards(entries: list[_OutTensor], max_bytes: int) -> list[list[_OutTensor]]:
    shards: list[list[_OutTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _copy_base_files(base: Path, out: Path, dtype: str | None) -> list[str]:
    copied = []
    for pattern in _COPY_PATTERNS:
        for file in sorted(base.glob(pattern)):
            if file.is_file() and not (out / file.name).exists():
                shutil.copy2(file, out / file.name)
                copied.append(file.name)
    config = out / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = dtype
        if "torch_dtype" in data:
            data["torch_dtype"] = dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return copied


# --------------------------------------------------------------------------------------------
# The merge


@contextmanager
def _progress_bar(console: Console | None, enabled: bool, total: int) -> Iterator[Callable]:
    with Progress(
        TextColumn("merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    ) as bar:
        task = bar.add_task("merge", total=total)
        yield lambda: bar.advance(task)


def merge(
    cfg: MergeConfig,
    *,
    console: Console | None = None,
    progress: bool = True,
    sparsity_tol: float = 1e-6,
) -> dict[str, Any]:
    """Merge `cfg.models` into `cfg.base` by `cfg.method` and write the result to `cfg.output`.

    All inputs are checked (architecture, tensor names, shapes, dtypes, LoRA targets) before
    anything is written. The output is a Hugging Face model directory (safetensors, sharded at
    `cfg.max_shard_gb`; config, generation config and tokenizer files copied from the base;
    `merge.json` with the config and this report), written through `atomic_dir`.

    Returns a report: output, method, tensors, parameters, seconds, output_bytes, and `models`,
    one entry per source with its path, kind (full / lora), weight and `DeltaStats` figures.
    """
    start = time.perf_counter()
    base = _open_base(cfg.base, cfg.revision)
    sources = [
        open_source(model_dir(m.path, m.revision), f"models[{i}]") for i, m in enumerate(cfg.models)
    ]
    out_dir = Path(cfg.output).expanduser()
    for s in (base, *sources):
        if out_dir.resolve() == s.path.resolve():
            raise MergeError(f"output {out_dir} is an input: {s.label}")
    problems = [p for s in sources for p in s.problems(base)]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if problems[20:] else [])
        raise MergeError("cannot merge:\n  " + "\n  ".join(shown))

    out_float = _CONFIG_DTYPES[cfg.dtype] if cfg.dtype else None
    entries = []
    for name, meta in base.weights.meta.items():
        floating = _ST_DTYPES[meta.dtype].is_floating_point
        entries.append(_OutTensor(name, (out_float or meta.dtype) if floating else meta.dtype,
                                  meta.shape))  # fmt: skip
    weights = [m.weight for m in cfg.models]
    densities = [m.density if m.density is not None else cfg.density for m in cfg.models]
    stats = [DeltaStats(sparsity_tol) for _ in sources]

    def merged(e: _OutTensor) -> torch.Tensor:
        base_t = base.weights.get(e.name)
        if not base_t.is_floating_point():
            return base_t
        base_f = base_t.float()
        deltas: list[torch.Tensor | None] = []
        for s, st in zip(sources, stats, strict=True):
            deltas.append(s.delta(e.name, base_f) if s.touches(e.name) else None)
            st.update(deltas[-1], base_t.numel())
        if all(d is None for d in deltas):
            return base_t.to(_ST_DTYPES[e.dtype])
        owned = [torch.zeros_like(base_f) if d is None else d for d in deltas]
        del deltas  # `owned` holds the only references, so _combine frees each as it goes
        delta = _combine(owned, weights, cfg, densities=densities, name=e.name)
        del owned
        return delta.add_(base_f).to(_ST_DTYPES[e.dtype])  # the result is ours to modify

    def compute(e: _OutTensor) -> torch.Tensor:
        t = merged(e)
        advance()
        return t

    shards = _shards(entries, max(1, int(cfg.max_shard_gb * 1e9)))
    with atomic_dir(out_dir) as tmp, _progress_bar(console, progress, len(entries)) as advance:
        out_bytes = 0
        if len(shards) == 1:
            out_bytes += write_safetensors(tmp / "model.safetensors", shards[0], compute)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                out_bytes += write_safetensors(tmp / file, shard, compute)
                weight_map.update({e.name: file for e in shard})
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": weight_map,
            }
            (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_base_files(base.path, tmp, cfg.dtype)
        report = {
            "output": str(out_dir),
            "method": cfg.method,
            "tensors": len(entries),
            "parameters": sum(math.prod(e.shape) for e in entries),
            "seconds": time.perf_counter() - start,
            "output_bytes": out_bytes,
            "shards": len(shards),
            "models": [
                {"path": m.path, "kind": s.kind, "weight": m.weight, **st.report()}
                for m, s, st in zip(cfg.models, sources, stats, strict=True)
            ],
        }
        merge_json = {"config": cfg.model_dump(mode="json"), "report": report}
        (tmp / "merge.json").write_text(json.dumps(merge_json, indent=2) + "\n")
    return report


def stored_dtypes(path: str | Path) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors stored in a model directory (headers only)."""
    path = Path(path)
    weights = Checkpoint(_weight_files(path, str(path)), str(path))
    dtypes = {_ST_DTYPES[m.dtype] for m in weights.meta.values()}
    return {d for d in dtypes if d.is_floating_point}
