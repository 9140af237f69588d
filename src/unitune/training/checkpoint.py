"""On-disk checkpoints for exact resume: safetensors and JSON only, written atomically.

Layout (one directory per saved step, under the run directory)::

    run_dir/checkpoints/
        step-00000010/
            model.safetensors     full model: `state_dict()`, tied weights stored once
              or adapter.safetensors  PeftModel: only the adapter (`get_peft_model_state_dict`)
            optimizer.safetensors every tensor of `optimizer.state_dict()`, named by its place,
                                  e.g. `state.3.exp_avg`, `state.3.step`
            optimizer.json        the rest of `optimizer.state_dict()` (param_groups, non-tensor
                                  state values); each tensor is `{"__tensor__": "<name>"}`
            scheduler.json        `scheduler.state_dict()` without entries JSON cannot hold
                                  (e.g. function objects)
            state.json            the caller's `state` dict
            tensors.safetensors   the caller's extra tensors (e.g. RNG states as uint8)
            manifest.json         {"version": 1, "step": 10,
                                   "files": {name: {"bytes": n, "sha256": hex}}}
        .step-00000020.tmp-4242/  a save in progress (or killed): ignored, removed by next save

Under an engine that shards the optimizer state across processes (FSDP, DeepSpeed ZeRO), the
model and optimizer files are replaced by ``engine/``: what every process wrote through
Accelerate's `save_state` (DeepSpeed's and torch's own formats, which pickle), each file listed
in the manifest as ``engine/<path>`` with its size and sha256. Such a checkpoint is restored with
`load_state`; resume only from engine checkpoints your own runs wrote.

Otherwise nothing is ever pickled: loading a checkpoint cannot execute code. Tied weights are
written once; the other names are listed in the file's `__metadata__` under `unitune.aliases`
(JSON of alias -> stored name). The safetensors files are streamed one tensor at a time (so
saving needs no second copy of the state in memory) and read back with the `safetensors`
library.

Atomicity: a save writes every file into the hidden sibling `.step-N.tmp-<pid>`, fsyncs each,
writes `manifest.json` last (fsynced), fsyncs the directory, renames it to `step-N` and fsyncs
`checkpoints/`. A checkpoint without a manifest, or whose files do not match it, is never used. An
existing `step-N` is moved aside (`.step-N.old-<pid>`) only once the new one is complete, then
deleted; a crash between those two renames is repaired by the next save. A crash or `kill -9` at
any moment therefore leaves every previously completed checkpoint intact. One process writes to
a run directory at a time (under Accelerate: the main process).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unitune.core.io import (
    ST_NAMES,
    TensorEntry,
    file_sha256,
    fsync_dir,
    safetensors_chunks,
    write_file,
)
from unitune.models.lora import is_peft

VERSION = 1
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
STATE_JSON = "state.json"
TENSORS_FILE = "tensors.safetensors"
MANIFEST = "manifest.json"
REQUIRED = (OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, STATE_JSON, TENSORS_FILE)
ENGINE_DIR = "engine"  # Accelerate's save_state of a sharding engine (model and optimizer)
ENGINE_REQUIRED = (SCHEDULER_JSON, STATE_JSON, TENSORS_FILE)
ALIASES_KEY = "unitune.aliases"
TENSOR_TAG = "__tensor__"

_STEP_DIR = re.compile(r"step-(\d+)")
_HIDDEN_DIR = re.compile(r"\.step-(\d+)\.(tmp|old|del)-\d+")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, verified or loaded; the message is one line."""


@dataclass
class Checkpoint:
    """A verified checkpoint directory, its step and its manifest."""

    path: Path
    step: int
    manifest: dict


# --------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict,
    tensors: dict[str, torch.Tensor] | None = None,
    keep_last: int = 2,
    keep: set[int] | frozenset[int] = frozenset(),
    engine_state: Path | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-<step:08d>/` atomically and return its path.

    `engine_state`: a directory that every process wrote its shards of the model and optimizer
    into (`accelerator.save_state`); it is moved in as `engine/` and `model` / `optimizer` are
    not saved (pass None).

    `model` is the bare model (`accelerator.unwrap_model(model)`; DDP and `torch.compile`
    wrappers are unwrapped here too): a `PeftModel` saves only its adapter. `optimizer` and
    `scheduler` are saved through their `state_dict()`. `state` must be JSON-serialisable (string
    keys; tuples come back as lists); `tensors` holds any other tensors to restore (RNG states:
    `torch.get_rng_state()`, `torch.cuda.get_rng_state(i)`, `generator.get_state()`).

    After a successful save, leftover temporary directories are removed and only the newest
    `keep_last` checkpoints are kept, plus this one and every step in `keep`.

    Raises `CheckpointError` (one line, naming the step and the previous checkpoint, which is left
    intact) on any OSError while writing, e.g. a full disk, and when something cannot be saved
    without pickle. The temporary directory is removed in every failure.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    root = Path(run_dir) / CHECKPOINTS
    final = root / dir_name(step)

    # Everything that can fail without touching the disk fails here, before anything is written.
    if engine_state is None:
        model_file, model_tensors, aliases = _model_payload(model)
        opt_json, opt_tensors = _optimizer_payload(optimizer)
    sched_json = _scheduler_payload(scheduler)
    state_bytes = _json_bytes(state, "state")
    extra = _extra_tensors(tensors)

    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        _make_dirs(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if engine_state is None:
            meta = {ALIASES_KEY: json.dumps(aliases, sort_keys=True)} if aliases else {}
            files = {
                model_file: _write_safetensors(tmp / model_file, model_tensors, meta),
                OPTIMIZER_TENSORS: _write_safetensors(tmp / OPTIMIZER_TENSORS, opt_tensors),
                OPTIMIZER_JSON: _write_file(tmp / OPTIMIZER_JSON, [opt_json]),
            }
        else:
            os.replace(engine_state, tmp / ENGINE_DIR)
            files = _adopt_tree(tmp, ENGINE_DIR)
        files |= {
            SCHEDULER_JSON: _write_file(tmp / SCHEDULER_JSON, [sched_json]),
            STATE_JSON: _write_file(tmp / STATE_JSON, [state_bytes]),
            TENSORS_FILE: _write_safetensors(tmp / TENSORS_FILE, extra),
        }
        manifest = {"version": VERSION, "step": step, "files": files}
        _write_file(tmp / MANIFEST, [_json_bytes(manifest, "manifest")])
        fsync_dir(tmp)
        _move_into_place(tmp, final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(step, root, err)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _tidy(root, keep_last, set(keep) | {step})
    return final


def _adopt_tree(root: Path, sub: str) -> dict[str, dict]:
    """Size and sha256 of every file under `root/sub` (written by another library), by its path
    relative to `root`; each file and directory fsynced."""
    files = {}
    for path in sorted((root / sub).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            info = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            files[path.relative_to(root).as_posix()] = info
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root / sub)
    return files


def is_engine_checkpoint(manifest: dict) -> bool:
    """Whether the checkpoint holds a sharding engine's state (`engine/`), not model files."""
    return any(name.startswith(ENGINE_DIR + "/") for name in manifest["files"])


def dir_name(step: int) -> str:
    """The directory name of step `step`'s checkpoint under `run_dir/checkpoints/`."""
    return f"step-{step:08d}"


def step_path(run_dir: str | Path, step: int) -> Path:
    """Where step `step`'s checkpoint of the run in `run_dir` lives (or would)."""
    return Path(run_dir) / CHECKPOINTS / dir_name(step)


def _write_failure(step: int, root: Path, err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    previous = [p for p in _step_dirs(root) if (p / MANIFEST).is_file()]
    if previous:
        tail = f"previous checkpoint step {step_of(previous[-1])} is intact"
    else:
        tail = "there is no previous checkpoint"
    return _one_line(f"cannot write checkpoint step {step} to {root}: {reason}; {tail}")


def _make_dirs(root: Path) -> None:
    if root.is_dir():
        return
    root.mkdir(parents=True, exist_ok=True)
    fsync_dir(root.parent)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is replaced only now."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _tidy(root: Path, keep_last: int, pinned: set[int]) -> None:
    """Remove leftover hidden dirs and checkpoints beyond the newest `keep_last` (not `pinned`)."""
    try:
        for entry in sorted(root.iterdir()):
            match = _HIDDEN_DIR.fullmatch(entry.name)
            if match is None or not entry.is_dir():
                continue
            target = root / dir_name(int(match.group(1)))
            if match.group(2) == "old" and not target.exists():
                os.replace(entry, target)  # a save died between its two renames: undo the first
            else:
                shutil.rmtree(entry, ignore_errors=True)
        dirs = _step_dirs(root)
        kept = {p.name for p in dirs[-keep_last:]} | {dir_name(s) for s in pinned}
        for path in dirs:
            if path.name not in kept:
                trash = root / f".{path.name}.del-{os.getpid()}"
                os.replace(path, trash)  # gone from view at once; rmtree may be interrupted
                shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(root)
    except OSError as err:
        warnings.warn(f"could not tidy old checkpoints in {root}: {err}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Finding and verifying


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The `step-N` directories under `run_dir/checkpoints`, oldest step first (not verified).

    Hidden temporary directories (`.step-N.tmp-<pid>`) are not listed.
    """
    return _step_dirs(Path(run_dir) / CHECKPOINTS)


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(dirs, key=step_of)


def step_of(path: Path) -> int:
    """The step of a checkpoint directory, from its name."""
    return int(path.name.split("-", 1)[1])


def latest_checkpoint(run_dir: Path, log: Callable[[str], Any] = print) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None.

    Candidates are verified newest first; each bad one (partial, corrupt) is skipped with one
    line through `log` naming its directory and the problem.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            manifest = verify(path)
        except CheckpointError as err:
            log(f"skipping checkpoint: {err}")
            continue
        return Checkpoint(path=path, step=manifest["step"], manifest=manifest)
    return None


def verify(path: Path) -> dict:
    """Check a checkpoint directory against its manifest and return the manifest.

    The manifest must be present and valid, list the model (or adapter) and every other file of
    the format, and each listed file must exist with the listed size and sha256. Raises
    `CheckpointError` ("checkpoint DIR: what is wrong") otherwise.
    """
    path = Path(path)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(_one_line(f"checkpoint {path}: {problem}"))

    if not path.is_dir():
        raise fail("not a directory")
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise fail(f"no {MANIFEST} (incomplete write)") from None
    except OSError as err:
        raise fail(f"cannot read {MANIFEST}: {err.strerror or err}") from err
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise fail(f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise fail(f"{MANIFEST} is not a JSON object")
    if manifest.get("version") != VERSION:
        raise fail(f"format version {manifest.get('version')!r} is not supported (need {VERSION})")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise fail(f"{MANIFEST} has no integer step")
    if _STEP_DIR.fullmatch(path.name) and step_of(path) != step:
        raise fail(f"{MANIFEST} says step {step}, the directory name says {step_of(path)}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise fail(f"{MANIFEST} has no file list")
    engine = any(isinstance(n, str) and n.startswith(ENGINE_DIR + "/") for n in files)
    models = [name for name in (MODEL_FILE, ADAPTER_FILE) if name in files]
    if len(models) != (0 if engine else 1):
        raise fail(
            f"{MANIFEST} must list exactly one of {MODEL_FILE}, {ADAPTER_FILE}"
            + (f" or files under {ENGINE_DIR}/" if not models else f", not with {ENGINE_DIR}/")
        )
    for name in ENGINE_REQUIRED if engine else REQUIRED:
        if name not in files:
            raise fail(f"{MANIFEST} does not list {name}")
    for name, info in files.items():
        parts = name.split("/") if isinstance(name, str) else [""]
        inside = len(parts) == 1 or (parts[0] == ENGINE_DIR and len(parts) > 1)
        if not inside or name == MANIFEST or any(x in ("", ".", "..") for x in parts):
            raise fail(f"{MANIFEST} lists a bad file name {name!r}")
        if "\\" in name or not isinstance(info, dict):
            raise fail(f"{MANIFEST} lists a bad entry for {name!r}")
        size, digest = info.get("bytes"), info.get("sha256")
        if not isinstance(size, int) or not isinstance(digest, str):
            raise fail(f"{MANIFEST} has no size and sha256 for {name}")
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            raise fail(f"{name} is missing") from None
        except OSError as err:
            raise fail(f"cannot read {name}: {err.strerror or err}") from err
        if actual != size:
            raise fail(f"{name} is {actual} bytes, the manifest says {size} (truncated or corrupt)")
    for name, info in files.items():
        try:
            actual_digest = file_sha256(path / name)
        except OSError as err:
            raise fail(f"cannot read {name}: {err.strerror or err}") from err
        if actual_digest != info["sha256"]:
            raise fail(f"{name} does not match its sha256 in the manifest (corrupt)")
    return manifest


# --------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    ckpt: Checkpoint, *, model: Any, optimizer: Any, scheduler: Any
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Verify `ckpt`, restore model, optimizer and scheduler in place; return `(state, tensors)`.

    `model`, `optimizer` and `scheduler` must be built as for the saved run (same model and
    LoRA config, same parameter groups), as the trainer does on resume. Weights are copied in
    bitwise (a dtype or shape mismatch is an error, checked before anything is changed);
    optimizer state goes to the device and dtype of the matching current state, else to its
    parameter's device (`Optimizer.load_state_dict` then applies its usual dtype policy).
    `tensors` come back on the CPU.
    """
    path = Path(ckpt.path)
    manifest = verify(path)
    files = manifest["files"]
    try:
        if is_engine_checkpoint(manifest):  # the caller loads `engine/` (`load_state`)
            if model is not None or optimizer is not None:
                raise CheckpointError(
                    f"holds a sharding engine's state ({ENGINE_DIR}/): resume it under the same "
                    "engine (FSDP or DeepSpeed ZeRO)"
                )
        else:
            if model is None:
                raise CheckpointError(
                    "holds the model and optimizer files, not a sharding engine's state: resume "
                    "it without FSDP / DeepSpeed ZeRO (one process or DDP)"
                )
            model_file = ADAPTER_FILE if ADAPTER_FILE in files else MODEL_FILE
            _load_model(model, path / model_file)
            _load_optimizer(
                optimizer,
                json.loads((path / OPTIMIZER_JSON).read_bytes()),
                _read_safetensors(path / OPTIMIZER_TENSORS)[0],
            )
        _load_scheduler(scheduler, json.loads((path / SCHEDULER_JSON).read_bytes()))
        state = json.loads((path / STATE_JSON).read_bytes())
        tensors = _read_safetensors(path / TENSORS_FILE)[0]
    except CheckpointError as err:
        raise CheckpointError(_one_line(f"checkpoint {path}: {err}")) from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            _one_line(f"checkpoint {path}: cannot load: {type(err).__name__}: {err}")
        ) from err
    return state, tensors


# --------------------------------------------------------------------------------------------
# Model


def _unwrap(model: Any) -> Any:
    """The bare module under DDP / DataParallel and `torch.compile` wrappers."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _peft_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    # save_embedding_layers="auto" would look up the base model's config on the hub.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _model_payload(model: Any) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(file name, tensors to write, alias -> stored name for tied weights)."""
    model = _unwrap(model)
    if is_peft(model):
        return ADAPTER_FILE, dict(_peft_state(model)), {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = None
        if tensor.numel() > 0:
            key = (
                tensor.device,
                tensor.data_ptr(),
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
            )
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor
    return MODEL_FILE, tensors, aliases


def _load_model(model: Any, path: Path) -> None:
    model = _unwrap(model)
    peft = is_peft(model)
    if peft != (path.name == ADAPTER_FILE):
        saved = "a LoRA adapter" if path.name == ADAPTER_FILE else "a full model"
        raise CheckpointError(f"it holds {saved}, but the model is {_kind(model)}")
    saved, meta = _read_safetensors(path)
    for alias, stored in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        saved[alias] = saved[stored]
    current = _peft_state(model) if peft else model.state_dict()
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    if missing or extra:
        raise CheckpointError(
            f"its weights do not fit the model: {len(missing)} missing (e.g. "
            f"{missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
        )
    for name, tensor in saved.items():
        have = current[name]
        if tensor.shape != have.shape or tensor.dtype != have.dtype:
            raise CheckpointError(
                f"weight {name} is {tuple(tensor.shape)} {tensor.dtype} in the checkpoint but "
                f"{tuple(have.shape)} {have.dtype} in the model"
            )
    if peft:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, saved)
        if result.unexpected_keys:
            raise CheckpointError(f"adapter weights not used: {result.unexpected_keys[:3]}")
    else:
        model.load_state_dict(saved, strict=True)


def _kind(model: Any) -> str:
    return "a PeftModel (LoRA)" if is_peft(model) else "a full model"


# --------------------------------------------------------------------------------------------
# Optimizer and scheduler


def _optimizer_payload(optimizer: Any) -> tuple[bytes, dict[str, torch.Tensor]]:
    """`optimizer.state_dict()` as (JSON bytes, tensors named by their place)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    encoded = {
        key: _encode(value, key, tensors, "optimizer state")
        for key, value in sd.items()
        if key != "state"
    }
    encoded["state"] = {
        str(index): _encode(values, f"state.{index}", tensors, "optimizer state")
        for index, values in sd["state"].items()
    }
    return _json_bytes(encoded, "optimizer state"), tensors


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor], what: str) -> Any:
    """A JSON-able copy of `obj`; each tensor goes into `tensors[where]`, leaving a tag."""
    if isinstance(obj, torch.Tensor):
        if where in tensors:
            raise CheckpointError(f"cannot save {what}: two tensors would be named {where!r}")
        tensors[where] = obj
        return {TENSOR_TAG: where}
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(f"cannot save {what}: key {key!r} at {where!r}")
            out[str(key)] = _encode(value, f"{where}.{key}", tensors, what)
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{where}.{i}", tensors, what) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CheckpointError(
        f"cannot save {what}: {where!r} holds a {type(obj).__name__}, which only pickle could save"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_TAG}:
            return tensors[obj[TENSOR_TAG]]
        return {key: _decode(value, tensors) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode(value, tensors) for value in obj]
    return obj


def _load_optimizer(optimizer: Any, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    decoded = _decode(saved, tensors)
    groups = optimizer.param_groups
    if len(decoded["param_groups"]) != len(groups):
        raise CheckpointError(
            f"the optimizer has {len(groups)} parameter groups, the checkpoint "
            f"{len(decoded['param_groups'])}"
        )
    for have, group in zip(groups, decoded["param_groups"], strict=True):
        if len(have["params"]) != len(group["params"]):
            raise CheckpointError(
                f"an optimizer parameter group has {len(have['params'])} parameters, the "
                f"checkpoint {len(group['params'])}"
            )
        for key, value in group.items():  # JSON turned tuples (e.g. betas) into lists
            if isinstance(have.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    params = [p for group in groups for p in group["params"]]
    current_state = optimizer.state
    state: dict[int, Any] = {}
    for index, values in decoded["state"].items():
        param = params[int(index)]
        current = current_state.get(param) or {}
        placed = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                have = current.get(name)
                if isinstance(have, torch.Tensor):
                    value = value.to(device=have.device, dtype=have.dtype)
                elif name != "step":  # torch places `step` itself (CPU unless fused/capturable)
                    value = value.to(device=param.device)
            placed[name] = value
        state[int(index)] = placed
    decoded["state"] = state
    optimizer.load_state_dict(decoded)


def _scheduler_payload(scheduler: Any) -> bytes:
    """`scheduler.state_dict()` without the entries JSON cannot hold (e.g. lr_lambdas objects)."""
    kept = {}
    for key, value in scheduler.state_dict().items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[key] = value
    return _json_bytes(kept, "scheduler state")


def _load_scheduler(scheduler: Any, saved: dict) -> None:
    merged = scheduler.state_dict()
    merged.update(saved)
    scheduler.load_state_dict(merged)


# --------------------------------------------------------------------------------------------
# Files


def _extra_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in (tensors or {}).items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot save tensors[{name!r}]: not a str -> torch.Tensor")
        out[name] = tensor
    return out


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save {what}: not JSON-serialisable: {err}") from err


def _write_file(path: Path, chunks: Iterable[Any]) -> dict:
    """Write `chunks` (bytes-like) to a new file, fsync it; return its size and sha256."""
    return write_file(path, chunks)


def _write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict:
    """Stream `tensors` into a safetensors file, one tensor in memory at a time."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is not")
    entries = []
    for name, tensor in tensors.items():
        if tensor.dtype not in ST_NAMES:
            raise CheckpointError(f"cannot save tensor {name!r}: dtype {tensor.dtype}")
        entries.append(TensorEntry(name, ST_NAMES[tensor.dtype], tuple(tensor.shape)))
    return _write_file(path, safetensors_chunks(entries, lambda e: tensors[e.name], metadata))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}, dict(fh.metadata() or {})


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines())
