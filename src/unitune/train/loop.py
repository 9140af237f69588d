"""The training loop: one explicit loop on Accelerate for every schedule, over one `TrainState`.

Read `train()` top to bottom: set up the run (model, data, reference log-probs: `session.Run`),
the optimizer and the state, resume from a checkpoint if asked, then for each step: reset the
reference if the schedule says so → plan → losses → backward → optimizer step → log → eval →
checkpoint. Everything that changes during a run lives in `TrainState` and is saved whole in
every checkpoint (`checkpoint.py`), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import get_scheduler

from unitune.config import Config, dump_config
from unitune.core import usage
from unitune.core.interrupts import Interrupted, Interrupts
from unitune.eval.heldout import Ideal
from unitune.models.load import save_model, trainable_parameters
from unitune.schedules.registry import Schedule, build_schedule
from unitune.train import checkpoint, trackers
from unitune.train.batches import BatchStream
from unitune.train.hub import push_model, require_token
from unitune.train.modelcard import write_model_card
from unitune.train.rundir import MetricsLog, atomic_write, report_dict, run_summary
from unitune.train.session import Run

# config keys a resumed run may change: they do not change what was already trained
RESUMABLE_CHANGES = (
    "name", "output_dir", "cache_dir", "train.max_steps", "train.eval_every",
    "train.save_every", "train.keep_last", "train.on_nonfinite", "train.save_model",
    "train.report_to", "train.push_to_hub", "train.hub_private",
    # generation and retention are measured, not trained on
    "eval.generate", "eval.judge", "eval.judge_url", "eval.judge_key_env", "eval.win_rate_against",
    "eval.generate_samples", "eval.max_new_tokens", "eval.retention_tasks", "eval.retention_limit",
)  # fmt: skip


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm (`train.on_nonfinite: error`)."""


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with this config."""


@dataclass
class TrainState:
    """Everything that changes during a run. `state_dict()` is JSON; the optimizer, the LR
    scheduler and the RNGs are saved beside it (`checkpoint.save_checkpoint`)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Schedule
    streams: dict[str, BatchStream]
    step: int = 0  # optimizer steps done
    steps: dict[str, int] = field(default_factory=lambda: {"sft": 0, "pref": 0})
    tokens: int = 0
    skipped: list[int] = field(default_factory=list)  # steps skipped for a non-finite value
    reference_fp: str | None = None  # sequential: the switched reference's fingerprint
    reference_step: int | None = None  # ... and the step whose checkpoint holds that model
    last_eval: dict[str, Any] = field(default_factory=dict)
    metrics_lines: int = 0
    train_s: float = 0.0  # training time of earlier sessions of this run
    eval_s: float = 0.0  # time spent in held-out evaluations so far (all sessions)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "steps": dict(self.steps),
            "tokens": self.tokens,
            "skipped": list(self.skipped),
            "reference_fp": self.reference_fp,
            "reference_step": self.reference_step,
            "last_eval": self.last_eval,
            "metrics_lines": self.metrics_lines,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "schedule": self.schedule.state_dict(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "python_rng": _python_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "tokens", "reference_fp", "reference_step", "metrics_lines"):
            setattr(self, key, state[key])
        self.steps, self.skipped = dict(state["steps"]), list(state["skipped"])
        self.last_eval, self.train_s = dict(state["last_eval"]), float(state["train_s"])
        self.eval_s = float(state.get("eval_s", 0.0))  # absent in checkpoints of 0.1.0
        self.schedule.load_state_dict(state["schedule"])
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))


def train(
    cfg: Config,
    ideal: Ideal,
    *,
    console: Console | None = None,
    progress: bool = True,
    resume: bool | str | Path = False,
) -> dict:
    """Run one single-schedule training job; returns the summary written to summary.json.

    `resume`: True for the newest valid checkpoint of `cfg.output_dir`, or a checkpoint path.
    Raises `Interrupted` after checkpointing on SIGTERM / SIGINT, `NonFiniteError` on a NaN/inf
    (unless `train.on_nonfinite: skip`), `ResumeError`, `checkpoint.CheckpointError`.
    """
    t_start, tc = time.time(), cfg.train
    if tc.push_to_hub:
        require_token()  # before anything is trained
    usage.reset_peaks()  # this run's own peak RSS, also when a process runs several
    run = Run(cfg, console, progress)
    con, out = run.console, run.out
    with Interrupts() as stop:
        run.poll = stop.check
        run.setup()
        usage.reset_peaks(run.device)  # accelerator memory: from the first training step
        run.ideal = ideal
        state = new_state(run, ideal)
        ckpt = find_checkpoint(out, resume, con) if resume else None
        if ckpt is not None:
            restore(run, state, ckpt, con)
        elif run.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(cfg))
        world = run.acc.num_processes
        global_batch = tc.batch_size * world * tc.grad_accum
        con.log(f"{run.engine.describe()}; batch: {tc.batch_size} per process x {world} "
                f"processes x {tc.grad_accum} accumulation = {global_batch} per step")  # fmt: skip
        trackers.start(run.acc, cfg, resumed_at=state.step if ckpt is not None else None)
        log = MetricsLog(out / "metrics.jsonl", keep=state.metrics_lines, enabled=run.main,
                         sink=trackers.sink(run.acc))  # fmt: skip
        items_log = batch_log(run, state)
        t_session = time.time()
        bar, task = progress_bar(con, progress and run.main, cfg.name or cfg.schedule.name,
                                 tc.max_steps)  # fmt: skip
        try:
            with bar:
                bar.update(task, completed=state.step)
                if not state.last_eval or (  # the start, or an eval a signal cut short
                    eval_due(cfg, state) and state.last_eval["step"] < state.step
                ):
                    evaluate(run, state, log, t_session)
                while state.step < tc.max_steps:
                    if state.schedule.resets_reference(state.step):
                        if state.last_eval.get("step") != state.step:  # the stage's end point
                            evaluate(run, state, log, t_session)
                        switch_reference(run, state, log, t_session)
                    plan, losses, tok_s = train_step(run, state, log, items_log)
                    if eval_due(cfg, state):
                        evaluate(run, state, log, t_session)
                    stopping = signalled(run, stop)  # every rank stops at the same step
                    if stopping or (tc.save_every and state.step % tc.save_every == 0):
                        save(run, state, log, t_session)
                    if stopping:
                        raise Interrupted(stopping, checkpoint=_latest(out))
                    bar.update(task, advance=1, info=_live(losses, state.last_eval, tok_s))
        except Interrupted as e:
            if e.checkpoint is None and state.step > 0:  # stopped inside an eval: keep the step
                e.checkpoint = save(run, state, log, t_session)
            raise
        finally:
            log.close()
            items_log.close()
            trackers.finish(run.acc)
    train_s = state.train_s + time.time() - t_session
    retention = run.retention()  # eval.retention_tasks on the final model
    summary = run_summary(
        cfg,
        ideal,
        state.last_eval,
        wall_s=time.time() - t_start,
        train_s=train_s,
        eval_s=round(state.eval_s, 2),
        **usage.costs(state.tokens, train_s - state.eval_s, run.device),
        **({"retention": retention} if retention else {}),
        steps=dict(state.steps),
        data={k: report_dict(s) for k, s in run.data.items()},
        skipped_nonfinite=state.skipped,
        world_size=world,
        engine=run.engine.describe(),
        global_batch=global_batch,
    )
    if tc.save_model:
        # FSDP / ZeRO-3: the weights gathered from every process onto the main one
        full = run.acc.get_state_dict(run.policy) if run.engine.shards_parameters else None
        if run.main:
            merge = bool(cfg.model.lora and cfg.model.lora.merge_on_save)
            weights = {k.removeprefix("model."): v for k, v in full.items()} if full else None
            save_model(run.acc.unwrap_model(run.policy).model, run.tokenizer, out / "model",
                       merge_lora=merge, state_dict=weights)  # fmt: skip
            write_model_card(out / "model", cfg, summary)  # README.md, beside the weights
    if run.main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    run.acc.wait_for_everyone()
    if tc.push_to_hub and tc.save_model and run.main:  # a failure: HubError, the model kept here
        url = push_model(out / "model", tc.push_to_hub, private=tc.hub_private, run_dir=out)
        con.log(f"pushed {out / 'model'} to {url}")
    return summary


# ------------------------------------------------------------------------------- the step
def train_step(
    run: Run, state: TrainState, log: MetricsLog, items_log: MetricsLog
) -> tuple[dict, dict, float]:
    """One optimizer step: `grad_accum` micro-batches of every stream, the schedule's plan on the
    first, backward, clip, step; the train lines logged (and each batch's items, `items_log`).
    Returns (plan, losses, tokens/s)."""
    tc, t0 = run.cfg.train, time.time()
    current: dict[str, list[int]] = {}
    plan: dict[str, float] | None = None
    losses: dict[str, float] = {}
    tokens = 0
    for _ in range(tc.grad_accum):
        for kind, stream in state.streams.items():
            current[kind] = next(stream)
        if plan is None:  # MAXRIGHT probes the first micro-batches
            plan = state.schedule.plan(state.step, lambda: run.probe(current))
        # Accelerate divides by grad_accum (DeepSpeed's engine does) and syncs the processes'
        # gradients on the last micro-batch only (DDP's no_sync, forward included, before it)
        with run.acc.accumulate(run.policy):
            total = 0.0
            for kind, weight in plan.items():
                loss, n_tok = run.loss(kind, current[kind])
                total = total + weight * loss
                tokens += n_tok
                losses[kind] = losses.get(kind, 0.0) + loss.item() / tc.grad_accum
            run.acc.backward(total)
        for kind, idx in current.items():
            items_log.write({"step": state.step + 1, "objective": kind, "items": idx,
                                 "trained": kind in plan})  # fmt: skip
    losses = run.global_mean(losses)  # every rank logs, checks and observes the same values
    limit = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
    grad_norm = float(run.acc.clip_grad_norm_(run.policy.parameters(), limit))
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad or not math.isfinite(grad_norm):
        nonfinite(run, state, bad, grad_norm, current)
    else:
        state.optimizer.step()
        state.scheduler.step()
        state.schedule.observe(losses)
        for kind in plan:
            state.steps[kind] += 1
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    step_s = time.time() - t0
    tok_s = tokens / max(step_s, 1e-9)
    for kind, v in losses.items():
        log.write({"type": "train", "step": state.step, "objective": kind, "loss": v,
                   "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens": tokens, "step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
                   **run.extras.pop(kind, {})})  # fmt: skip
    return plan, losses, tok_s


def nonfinite(run: Run, state: TrainState, bad: list[str], grad_norm: float, batches) -> None:
    """A NaN / inf loss or gradient norm: stop, naming the step, the objective, the batch's
    items and the last good checkpoint; or, with `on_nonfinite: skip`, skip the update."""
    what = ", ".join(f"{k} loss" for k in bad) or f"gradient norm ({grad_norm})"
    slots = bad or list(batches)
    items = "; ".join(f"data.{k}.train items {batches[k]}" for k in slots)
    if run.cfg.train.on_nonfinite == "skip":
        state.skipped.append(state.step + 1)
        run.console.log(f"step {state.step + 1}: non-finite {what}; skipped ({items})")
        return
    last = _latest(run.out)
    raise NonFiniteError(
        f"step {state.step + 1}: non-finite {what} on {items} (0-based, after validation); "
        f"last good checkpoint: {last.path if last else 'none (set train.save_every)'}; "
        "set train.on_nonfinite: skip to skip such steps"
    )


def batch_log(run: Run, state: TrainState) -> MetricsLog:
    """`train.log_batches`: this process's training items (0-based indices of the validated
    training set, as in a non-finite error) of every micro-batch of every stream, a line each."""
    path = run.out / "batches" / f"rank{run.acc.process_index}.jsonl"
    if run.cfg.train.log_batches:
        path.parent.mkdir(parents=True, exist_ok=True)
    kept = state.step * run.cfg.train.grad_accum * len(state.streams)  # lines per step are fixed
    return MetricsLog(path, keep=kept, enabled=run.cfg.train.log_batches)


def signalled(run: Run, stop: Interrupts) -> int | None:
    """The signal any process got (the largest number), the same on every rank."""
    if run.acc.num_processes == 1:
        return stop.requested
    got = run.global_mean({"signal": float(stop.requested or 0)})["signal"]
    return stop.requested or (signal.SIGTERM if got > 0 else None)


def eval_due(cfg: Config, state: TrainState) -> bool:
    return state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps


def evaluate(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> None:
    t0 = time.time()
    # a fresh run's first evaluation: the policy is the reference model, no forward needed
    figures = run.evaluate(at_start=state.step == 0 and state.reference_fp is None, step=state.step)
    state.eval_s += time.time() - t0
    rec = {"type": "eval", "step": state.step, **figures, "steps_sft": state.steps["sft"],
           "steps_pref": state.steps["pref"], "eval_s": round(time.time() - t0, 3),
           "elapsed_s": round(state.train_s + time.time() - t_session, 2)}  # fmt: skip
    log.write(rec)
    state.last_eval = rec


def switch_reference(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> None:
    """The schedule's reference reset (sequential's preference stage): the current model becomes
    the training reference. With checkpoints on, the model at this point is checkpointed and
    kept, so that a resumed run can recompute these reference log-probs if the cache is gone."""
    run.console.log(f"{state.schedule.name}: step {state.step}: reference = the current model")
    state.reference_fp = run.compute_references(initial=False)
    state.reference_step = state.step
    if run.cfg.train.save_every:
        save(run, state, log, t_session)


# ------------------------------------------------------------------------- set-up, resume
def new_state(run: Run, ideal: Ideal) -> TrainState:
    tc, sc = run.cfg.train, run.cfg.schedule
    optimizer = adamw(trainable_parameters(run.model), lr=tc.lr, weight_decay=tc.weight_decay)
    lr_sched = get_scheduler(tc.lr_schedule, optimizer, tc.warmup_steps, tc.max_steps)
    # the LR scheduler stays ours: Accelerate's wrapper steps it once per process per step
    run.policy, optimizer = run.acc.prepare(run.policy, optimizer)
    rank, world = run.acc.process_index, run.acc.num_processes
    streams = {
        k: BatchStream(s.train, tc.batch_size, tc.seed + i, run.partitions.get(k),
                       rank=rank, world=world)
        for i, (k, s) in enumerate(sorted(run.data.items()))
    }  # fmt: skip
    schedule = build_schedule(
        sc.name, sc.options(), lam=sc.lam, total_steps=tc.max_steps, seed=tc.seed,
        loss_sft_star=ideal.loss_sft, loss_pref_star=ideal.loss_pref,
    )  # fmt: skip
    return TrainState(optimizer, lr_sched, schedule, streams)


def find_checkpoint(out: Path, resume: bool | str | Path, con: Console) -> checkpoint.Checkpoint:
    if resume is True:
        ckpt = checkpoint.latest_checkpoint(out, log=con.log)
        if ckpt is None:
            raise ResumeError(f"--resume: no valid checkpoint in {out / 'checkpoints'}")
        return ckpt
    path = Path(resume)
    manifest = checkpoint.verify(path)
    return checkpoint.Checkpoint(path, int(manifest["step"]), manifest)


def restore(run: Run, state: TrainState, ckpt: checkpoint.Checkpoint, con: Console) -> None:
    """Load model, optimizer, scheduler, RNGs and `TrainState` from `ckpt`, after checking that
    the config differs from the checkpoint's only where that cannot change the run."""
    t0 = time.time()
    saved = json.loads((ckpt.path / "state.json").read_text())
    changed = config_changes(with_defaults(saved["config"]), run.cfg.model_dump(mode="json"))
    if changed:
        raise ResumeError(
            f"--resume {ckpt.path}: the config differs from the checkpoint's in "
            f"{'; '.join(changed)}; only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    steps = saved["config"]["train"]["max_steps"], run.cfg.train.max_steps
    if steps[0] != steps[1] and run.cfg.train.lr_schedule != "constant":
        raise ResumeError(
            f"--resume {ckpt.path}: train.max_steps ({steps[0]} -> {steps[1]}) with lr_schedule "
            f"{run.cfg.train.lr_schedule!r}: the LR decays to 0 at max_steps, and the steps so far "
            "followed the old end; resume with the same max_steps (or train on from the saved "
            "model in a new run)"
        )
    if saved["state"]["reference_fp"] is not None:
        # the switched reference (sequential): from the cache, or recomputed from its checkpoint
        if run.compute_references(initial=False, model_fp=saved["state"]["reference_fp"]) is None:
            pinned = _checkpoint_at(run.out, saved["state"]["reference_step"])
            con.log(f"reference log-probs not in the cache: recomputing from {pinned.path}")
            load(run, state, pinned)
            run.compute_references(initial=False)
    # reference log-probs come from the cache or were recomputed (by `setup`, or from the switch's
    # checkpoint above): they must be the very entries the checkpoint was trained with
    differ = [k for k, v in saved["references"].items() if _entries(run).get(k) != v]
    if differ:
        raise ResumeError(
            f"--resume {ckpt.path}: the reference log-probs of {', '.join(differ)} are not the "
            "ones this run was trained with (the model or the data changed)"
        )
    saved_state, tensors = load(run, state, ckpt)
    state.load_state_dict(saved_state["state"])
    run.acc.wait_for_everyone()  # every process has read it before the main one prunes
    for later in checkpoint.list_checkpoints(run.out) if run.main else []:
        if checkpoint.step_of(later) > ckpt.step:  # a future this resume replaces
            shutil.rmtree(later)
    torch.set_rng_state(tensors["torch_rng"])
    if torch.cuda.is_available() and "cuda_rng" in tensors:
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    con.log(f"resumed from {ckpt.path} at step {state.step} ({time.time() - t0:.2f} s)")


def load(run: Run, state: TrainState, ckpt: checkpoint.Checkpoint) -> tuple[dict, dict]:
    """Model, optimizer and scheduler from `ckpt`; returns its (state, tensors). A sharding
    engine's model and optimizer come from its `engine/` through Accelerate's `load_state`."""
    sharded = run.engine.shards_optimizer
    model = None if sharded else run.acc.unwrap_model(run.policy).model
    saved = checkpoint.load_checkpoint(
        ckpt, model=model, optimizer=None if sharded else state.optimizer,
        scheduler=state.scheduler,
    )  # fmt: skip
    if sharded:
        run.acc.load_state(str(ckpt.path / checkpoint.ENGINE_DIR))
    return saved


def with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the defaults of keys added since it was written (a key that
    did not exist then had its default's effect), as far as it still validates."""
    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key (old -> new)` for every leaf that differs, except `RESUMABLE_CHANGES`."""
    out = []
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b and path not in RESUMABLE_CHANGES:
            out.append(f"{path} ({a!r} -> {b!r})")
    return out


def save(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> checkpoint.Checkpoint:
    """A checkpoint of this step (main process), `keep_last` kept, the switch point pinned."""
    tc, t0 = run.cfg.train, time.time()
    state.metrics_lines = log.lines
    snapshot = state.state_dict()
    snapshot["train_s"] += time.time() - t_session
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    path = run.out / "checkpoints" / checkpoint.dir_name(state.step)
    engine_state = None
    if run.engine.shards_optimizer:  # every process writes its shards, the main one the rest
        engine_state = path.with_name(f".{path.name}.tmp-0")  # (no process has pid 0)
        if run.main:
            shutil.rmtree(engine_state, ignore_errors=True)
        run.acc.wait_for_everyone()
        run.acc.save_state(str(engine_state))
        run.acc.wait_for_everyone()
    if not run.main:  # one writer; the others wait until it is in place
        run.acc.wait_for_everyone()
        return checkpoint.Checkpoint(path, state.step, {})
    model = None if engine_state else run.acc.unwrap_model(run.policy).model
    path = checkpoint.save_checkpoint(
        run.out, state.step,
        model=model, optimizer=None if engine_state else state.optimizer,
        scheduler=state.scheduler, engine_state=engine_state,
        state={"config": run.cfg.model_dump(mode="json"), "state": snapshot,
               "references": _entries(run)},
        tensors=tensors, keep_last=tc.keep_last,
        keep={state.reference_step} if state.reference_step is not None else set(),
    )  # fmt: skip
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    run.console.log(
        f"checkpoint step {state.step}: {path} ({size:.1f} MB, {time.time() - t0:.2f} s)"
    )
    run.acc.wait_for_everyone()
    return checkpoint.Checkpoint(path, state.step, {})


# -------------------------------------------------------------------------------- helpers
def adamw(params: list, **kw) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (on CPU a 135M-param step: 0.6 s -> 0.09 s)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def progress_bar(con: Console, enabled: bool, name: str, total: int):
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=con,
        disable=not enabled,
    )  # fmt: skip
    return bar, bar.add_task(name, total=total, info="")


def _live(losses: dict, ev: dict, tok_s: float) -> str:
    parts = [f"{k}={v:.3f}" for k, v in losses.items()]
    parts += [
        f"f_sft={ev['f_sft']:.3f}" if "f_sft" in ev else "",
        f"f_pref={ev['f_pref']:.3f}" if "f_pref" in ev else "",
        f"{tok_s:.0f} tok/s",
    ]
    return " ".join(p for p in parts if p)


def _latest(out: Path) -> checkpoint.Checkpoint | None:
    return checkpoint.latest_checkpoint(out, log=lambda msg: None)


def _entries(run: Run) -> dict[str, str]:
    """The reference cache entries in use, by `slot/split/input` (named in every checkpoint)."""
    return {"/".join(key): entry for key, entry in run.refs.entries.items()}


def _checkpoint_at(out: Path, step: int) -> checkpoint.Checkpoint:
    path = out / "checkpoints" / checkpoint.dir_name(step)
    if not path.is_dir():
        raise ResumeError(
            f"{out}: the checkpoint of step {step} (the reference's model) is missing"
        )
    return checkpoint.Checkpoint(path, step, checkpoint.verify(path))


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
