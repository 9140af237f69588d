"""`unitune merge`: a base and N fine-tuned models (or LoRA adapters) into one HF model directory.

The methods are those of docs/methods.md, "Merging", on the deltas `d_i = theta_i - theta_base`
(`methods.py`: a table of sparsifier and consensus, as mergekit's). The merge streams: tensors
are read one at a time from the safetensors files of the base and of each model (`readers.py`),
merged, and written straight into the output's safetensors files, whose headers are known up
front from the base's metadata. Peak memory is therefore a few tensors (the largest one, once per
model), not N models.

Everything is validated before anything is written, and the output directory is written through
`atomic_dir`: it appears only once the merge has fully succeeded.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from unitune.config import MergeConfig
from unitune.core.io import ST_DTYPES, TensorEntry, atomic_dir, safetensors_chunks, write_file
from unitune.core.progress import ProgressBar
from unitune.merging.errors import MergeError
from unitune.merging.methods import combine_owned, method_of
from unitune.merging.readers import INDEX, open_base, open_source
from unitune.merging.sparsity import DeltaStats
from unitune.models.source import model_dir

_CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
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
    method_of(cfg.method)  # an unknown method fails before anything is read
    base = open_base(cfg.base, cfg.revision)
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
        floating = ST_DTYPES[meta.dtype].is_floating_point
        entries.append(TensorEntry(name, (out_float or meta.dtype) if floating else meta.dtype,
                                  meta.shape))  # fmt: skip
    weights = [m.weight for m in cfg.models]
    densities = [m.density if m.density is not None else cfg.density for m in cfg.models]
    stats = [DeltaStats(sparsity_tol) for _ in sources]

    def merged(e: TensorEntry) -> torch.Tensor:
        base_t = base.weights.get(e.name)
        if not base_t.is_floating_point():
            return base_t
        base_f = base_t.float()
        deltas: list[torch.Tensor | None] = []
        for s, st in zip(sources, stats, strict=True):
            deltas.append(s.delta(e.name, base_f) if s.touches(e.name) else None)
            st.update(deltas[-1], base_t.numel())
        if all(d is None for d in deltas):
            return base_t.to(ST_DTYPES[e.dtype])
        owned = [torch.zeros_like(base_f) if d is None else d for d in deltas]
        del deltas  # `owned` holds the only references, so combine_owned frees each as it goes
        delta = combine_owned(owned, weights, cfg, densities=densities, name=e.name)
        del owned
        return delta.add_(base_f).to(ST_DTYPES[e.dtype])  # the result is ours to modify

    def compute(e: TensorEntry) -> torch.Tensor:
        t = merged(e)
        bar.advance()
        return t

    def write(path: Path, shard: list[TensorEntry]) -> int:
        return write_file(path, safetensors_chunks(shard, compute), digest=False)["bytes"]

    shards = _shards(entries, max(1, int(cfg.max_shard_gb * 1e9)))
    bar = ProgressBar("merging tensors", len(entries), console=console, enabled=progress)
    with atomic_dir(out_dir) as tmp, bar:
        out_bytes = 0
        if len(shards) == 1:
            out_bytes += write(tmp / "model.safetensors", shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                out_bytes += write(tmp / file, shard)
                weight_map.update({e.name: file for e in shard})
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in entries)},
                "weight_map": weight_map,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
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


def _shards(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    shards: list[list[TensorEntry]] = [[]]
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
