"""A run's step checkpointed, and a run resumed from such a checkpoint.

`save_step` writes the model, optimizer, LR scheduler, `TrainState` and RNGs of the current step
(`checkpoint.py`; a sharding engine's model and optimizer through Accelerate's `save_state`).
`restore` checks that the config differs from the checkpoint's only in fields that declare
themselves resumable (`json_schema_extra={"resumable": True}` in `config.py`), and that the
schedule's plan does not depend on a changed `train.max_steps`, then loads it all back.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from rich.console import Console
from torch import nn

from unitune.config import Config
from unitune.schedules.registry import SCHEDULES
from unitune.training import checkpoint
from unitune.training.reference_set import References
from unitune.training.session import Session
from unitune.training.state import TrainState


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with this config."""


def find_checkpoint(out: Path, resume: bool | str | Path, con: Console) -> checkpoint.Checkpoint:
    """`resume`: True for the newest valid checkpoint of `out`, or a checkpoint path."""
    if resume is True:
        ckpt = checkpoint.latest_checkpoint(out, log=con.log)
        if ckpt is None:
            raise ResumeError(f"--resume: no valid checkpoint in {out / 'checkpoints'}")
        return ckpt
    path = Path(resume)
    manifest = checkpoint.verify(path)
    return checkpoint.Checkpoint(path, int(manifest["step"]), manifest)


def latest(out: Path) -> checkpoint.Checkpoint | None:
    """The newest valid checkpoint of the run in `out`, quietly."""
    return checkpoint.latest_checkpoint(out, log=lambda msg: None)


def restore(
    session: Session,
    module: nn.Module,
    state: TrainState,
    refs: References,
    ckpt: checkpoint.Checkpoint,
) -> None:
    """Load model, optimizer, scheduler, RNGs and `TrainState` from `ckpt`, after checking that
    the config differs from the checkpoint's only where that cannot change the run."""
    t0, cfg, con = time.time(), session.cfg, session.console
    saved = json.loads((ckpt.path / "state.json").read_text())
    changed = config_changes(with_defaults(saved["config"]), cfg.model_dump(mode="json"))
    if changed:
        raise ResumeError(
            f"--resume {ckpt.path}: the config differs from the checkpoint's in "
            f"{'; '.join(changed)}; only {', '.join(resumable_keys())} may change"
        )
    steps = saved["config"]["train"]["max_steps"], cfg.train.max_steps
    name = cfg.schedule.name
    if steps[0] != steps[1] and getattr(SCHEDULES.get(name), "depends_on_total_steps", False):
        raise ResumeError(
            f"cannot resume: schedule {name} plans by train.max_steps ({steps[0]} -> {steps[1]})"
        )
    if steps[0] != steps[1] and cfg.train.lr_schedule != "constant":
        raise ResumeError(
            f"--resume {ckpt.path}: train.max_steps ({steps[0]} -> {steps[1]}) with lr_schedule "
            f"{cfg.train.lr_schedule!r}: the LR decays to 0 at max_steps, and the steps so far "
            "followed the old end; resume with the same max_steps (or train on from the saved "
            "model in a new run)"
        )
    if saved["state"]["reference_fp"] is not None:
        # the switched reference (sequential): from the cache, or recomputed from its checkpoint
        if not refs.load_switched(module, saved["state"]["reference_fp"]):
            pinned = checkpoint_at(session.out, saved["state"]["reference_step"])
            con.log(f"reference log-probs not in the cache: recomputing from {pinned.path}")
            load_step(session, module, state, pinned)
            refs.switch(module)
    # reference log-probs come from the cache or were recomputed (by `References`, or from the
    # switch's checkpoint above): they must be the very entries the checkpoint was trained with
    differ = [k for k, v in saved["references"].items() if refs.entries.get(k) != v]
    if differ:
        raise ResumeError(
            f"--resume {ckpt.path}: the reference log-probs of {', '.join(differ)} are not the "
            "ones this run was trained with (the model or the data changed)"
        )
    saved_state, tensors = load_step(session, module, state, ckpt)
    state.load_state_dict(saved_state["state"], tensors)
    session.acc.wait_for_everyone()  # every process has read it before the main one prunes
    for later in checkpoint.list_checkpoints(session.out) if session.main else []:
        if checkpoint.step_of(later) > ckpt.step:  # a future this resume replaces
            shutil.rmtree(later)
    con.log(f"resumed from {ckpt.path} at step {state.step} ({time.time() - t0:.2f} s)")


def load_step(
    session: Session, module: nn.Module, state: TrainState, ckpt: checkpoint.Checkpoint
) -> tuple[dict, dict]:
    """Model, optimizer and scheduler from `ckpt`; returns its (state, tensors). A sharding
    engine's model and optimizer come from its `engine/` through Accelerate's `load_state`."""
    sharded = session.engine.shards_optimizer
    model = None if sharded else session.acc.unwrap_model(module).model
    saved = checkpoint.load_checkpoint(
        ckpt, model=model, optimizer=None if sharded else state.optimizer,
        scheduler=state.scheduler,
    )  # fmt: skip
    if sharded:
        session.acc.load_state(str(ckpt.path / checkpoint.ENGINE_DIR))
    return saved


def save_step(
    session: Session,
    module: nn.Module,
    state: TrainState,
    refs: References,
    session_s: float,
) -> checkpoint.Checkpoint:
    """A checkpoint of this step (main process), `keep_last` kept, the switch point pinned.
    `session_s`: the training time of this session so far (added to the state's earlier)."""
    acc, tc, t0 = session.acc, session.cfg.train, time.time()
    snapshot = state.state_dict()  # every process: the online buffers are gathered
    extra = state.tensors()
    snapshot["train_s"] += session_s
    path = checkpoint.step_path(session.out, state.step)
    engine_state = None
    if session.engine.shards_optimizer:  # every process writes its shards, the main one the rest
        engine_state = path.with_name(f".{path.name}.tmp-0")  # (no process has pid 0)
        if session.main:
            shutil.rmtree(engine_state, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(engine_state))
        acc.wait_for_everyone()
    if not session.main:  # one writer; the others wait until it is in place
        acc.wait_for_everyone()
        return checkpoint.Checkpoint(path, state.step, {})
    model = None if engine_state else acc.unwrap_model(module).model
    path = checkpoint.save_checkpoint(
        session.out, state.step,
        model=model, optimizer=None if engine_state else state.optimizer,
        scheduler=state.scheduler, engine_state=engine_state,
        state={"config": session.cfg.model_dump(mode="json"), "state": snapshot,
               "references": refs.entries},
        tensors=extra, keep_last=tc.keep_last,
        keep={state.reference_step} if state.reference_step is not None else set(),
    )  # fmt: skip
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    session.console.log(
        f"checkpoint step {state.step}: {path} ({size:.1f} MB, {time.time() - t0:.2f} s)"
    )
    acc.wait_for_everyone()
    return checkpoint.Checkpoint(path, state.step, {})


def checkpoint_at(out: Path, step: int) -> checkpoint.Checkpoint:
    path = checkpoint.step_path(out, step)
    if not path.is_dir():
        raise ResumeError(
            f"{out}: the checkpoint of step {step} (the reference's model) is missing"
        )
    return checkpoint.Checkpoint(path, step, checkpoint.verify(path))


# ------------------------------------------------------------------------ the config diff
def with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the defaults of keys added since it was written (a key that
    did not exist then had its default's effect), as far as it still validates."""
    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section class a field holds (`X` or `X | None`), or None for a leaf."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def resumable(path: str, model: type[BaseModel] = Config) -> bool:
    """Whether the config field at dotted `path` declares that a resumed run may change it."""
    head, _, rest = path.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    if rest:
        section = _section(field.annotation)
        return section is not None and resumable(rest, section)
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("resumable") is True


def resumable_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every resumable field's dotted path."""
    out = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            out += resumable_keys(section, f"{prefix}{name}.")
        elif resumable(name, model):
            out.append(f"{prefix}{name}")
    return out


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key (old -> new)` for every leaf that differs, except the resumable fields."""
    out = []
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b and not resumable(path):
            out.append(f"{path} ({a!r} -> {b!r})")
    return out
