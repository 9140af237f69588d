"""The training loop: one explicit loop on Accelerate for every schedule, over one `TrainState`.

Read `train()` top to bottom: build the run's parts (the session's model and data, the reference
log-probs, the policy, the evaluator), the optimizer and the state, resume from a checkpoint if
asked, then for each step: reset the reference if the schedule says so -> plan -> losses ->
backward -> optimizer step -> log -> eval -> checkpoint; then `finish`. Everything that changes
during a run lives in `TrainState` and is saved whole in every checkpoint (`resume.py`), so a
resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import get_scheduler

from unitune.config import Config, dump_config
from unitune.core import usage
from unitune.core.interrupts import Interrupted, Interrupts
from unitune.core.phases import PHASES
from unitune.core.progress import ProgressBar
from unitune.eval.heldout import Ideal
from unitune.judges.base import JudgeError
from unitune.models.summary import trainable_parameters
from unitune.rewards import RewardError
from unitune.schedules.registry import build_schedule
from unitune.training import checkpoint, trackers
from unitune.training.batches import BatchStream
from unitune.training.evaluator import Evaluator, retention
from unitune.training.finish import finish
from unitune.training.generation import Generation
from unitune.training.hub import require_token
from unitune.training.online import Online, OnlineStream
from unitune.training.policy import Penalty, Policy
from unitune.training.profile import StepProfile, show
from unitune.training.reference_set import References
from unitune.training.resume import checkpoint_at, find_checkpoint, latest, restore, save_step
from unitune.training.rundir import MetricsLog, report_dict, run_summary
from unitune.training.session import Session
from unitune.training.state import TrainState


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm (`train.on_nonfinite: error`)."""


class JudgeFailedError(RuntimeError):
    """The judge of `eval.generate` failed during training; the step is checkpointed."""


@dataclass(frozen=True)
class Run:
    """The parts of one run, each built whole: its session (accelerator, model, data), the
    reference log-probs, the policy being trained and its held-out evaluator."""

    session: Session
    refs: References
    policy: Policy
    evaluator: Evaluator
    profile: StepProfile | None = None  # `train.profile`


def train(
    cfg: Config,
    ideal: Ideal,
    *,
    console: Console | None = None,
    progress: bool = True,
    resume: bool | str | Path = False,
    penalty: Penalty | None = None,
) -> dict:
    """Run one single-schedule training job; returns the summary written to summary.json.

    `resume`: True for the newest valid checkpoint of `cfg.output_dir`, or a checkpoint path.
    `penalty`: a term added to one slot's loss (PAFT's L1, given by `merge/paft.py`).
    Raises `Interrupted` after checkpointing on SIGTERM / SIGINT, `NonFiniteError` on a NaN/inf
    (unless `train.on_nonfinite: skip`), `JudgeFailedError` (after checkpointing the step),
    `resume.ResumeError`, `checkpoint.CheckpointError`.
    """
    t_start, tc = time.time(), cfg.train
    if tc.push_to_hub:
        require_token()  # before anything is trained
    usage.reset_peaks()  # this run's own peak RSS, also when a process runs several
    runtime_bytes = usage.current_rss_bytes()  # before the model: the profile's runtime memory
    with Interrupts() as stop:
        session = Session(cfg, console, poll=stop.check)
        con, out = session.console, session.out
        generation = Generation(session) if cfg.eval.generate else None
        refs = References(session)
        # the online slot: its rewards are loaded and its reference copied before `prepare`
        online = Online(session) if cfg.is_online else None
        usage.reset_peaks(session.device)  # accelerator memory: from the first training step
        module, state = new_state(session, ideal, online)
        policy = Policy(session, module, refs, penalty, online)
        profile = StepProfile(session.device, runtime_bytes, module) if tc.profile else None
        run = Run(session, refs, policy, Evaluator(policy, ideal, generation), profile)
        ckpt = find_checkpoint(out, resume, con) if resume else None
        if ckpt is not None:
            restore(session, module, state, refs, ckpt)
            if online is not None and state.reference_step is not None:
                online.restore_reference(checkpoint_at(out, state.reference_step))
        elif session.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(cfg))
        world = session.acc.num_processes
        global_batch = tc.batch_size * world * tc.grad_accum
        con.log(f"{session.engine.describe()}; batch: {tc.batch_size} per process x {world} "
                f"processes x {tc.grad_accum} accumulation = {global_batch} per step")  # fmt: skip
        trackers.start(session.acc, cfg, resumed_at=state.step if ckpt is not None else None)
        log = MetricsLog(out / "metrics.jsonl", keep=state.metrics_lines, enabled=session.main,
                         sink=trackers.sink(session.acc))  # fmt: skip
        items_log = batch_log(session, state)
        t_session = time.time()
        name, shown = cfg.name or cfg.schedule.name, progress and session.main
        bar = ProgressBar(name, tc.max_steps, console=con, enabled=shown)
        if profile is not None:  # from here: the `finally` below disables it
            profile.start()
        try:
            with bar:
                bar.update(completed=state.step)
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
                    stopping = signalled(session, stop)  # every rank stops at the same step
                    if stopping or (tc.save_every and state.step % tc.save_every == 0):
                        save(run, state, log, t_session)
                    if stopping:
                        raise Interrupted(stopping, checkpoint=latest(out))
                    bar.advance(info=_live(losses, state.last_eval, tok_s))
        except Interrupted as e:
            if e.checkpoint is None and state.step > 0:  # stopped inside an eval: keep the step
                e.checkpoint = save(run, state, log, t_session)
            raise
        except RewardError as e:  # a reward failed on a batch: nothing of the step is kept
            last = latest(out)
            where = f"last checkpoint: {last.path}" if last else "no checkpoint yet"
            raise RewardError(
                f"{e}; after step {state.step}; {where}", reward=e.reward, record=e.record
            ) from None
        finally:
            log.close()
            items_log.close()
            trackers.finish(session.acc)
            if profile is not None:
                PHASES.disable()
    train_s = state.train_s + time.time() - t_session
    kept = retention(session, module)  # eval.retention_tasks on the final model
    profiled = {}
    if profile is not None:
        profiled = {"profile": profile.summary(module, state.optimizer, tc.logprob_chunk_size)}
        if session.main:
            show(con, profiled["profile"])
    summary = run_summary(
        cfg,
        ideal,
        state.last_eval,
        wall_s=time.time() - t_start,
        train_s=train_s,
        eval_s=round(state.eval_s, 2),
        **usage.costs(state.tokens, train_s - state.eval_s, session.device),
        **({"retention": kept} if kept else {}),
        steps=dict(state.steps),
        data={k: report_dict(s) for k, s in session.data.items()},
        skipped_nonfinite=state.skipped,
        **profiled,
        world_size=world,
        engine=session.engine.describe(),
        global_batch=global_batch,
    )
    finish(session, module, summary)
    return summary


# ------------------------------------------------------------------------------- the step
def train_step(
    run: Run, state: TrainState, log: MetricsLog, items_log: MetricsLog
) -> tuple[dict, dict, float]:
    """One optimizer step: `grad_accum` micro-batches of every stream, the schedule's plan on the
    first, backward, clip, step; the train lines logged (and each batch's items, `items_log`).
    Returns (plan, losses, tokens/s)."""
    session, policy = run.session, run.policy
    acc, tc, t0 = session.acc, session.cfg.train, time.time()
    current: dict[str, Any] = {}
    plan: dict[str, float] | None = None
    losses: dict[str, float] = {}
    figures: dict[str, dict[str, list[float]]] = {}  # each slot's figures, per micro-batch
    watched: dict[str, float] = {}  # what the schedule observes (`Loss.watched`)
    tokens = 0
    profile = run.profile
    saved = profile.activations if profile is not None else contextlib.nullcontext
    if profile is not None:
        profile.begin()  # what an evaluation between steps recorded is not this step's
    for _ in range(tc.grad_accum):
        with PHASES.phase("collate"):
            for kind, stream in state.streams.items():
                current[kind] = next(stream)
        if plan is None:  # MAXRIGHT probes the first micro-batches
            with PHASES.phase("probe"):
                plan = state.schedule.plan(state.step, lambda: policy.probe(current))
        # Accelerate divides by grad_accum (DeepSpeed's engine does) and syncs the processes'
        # gradients on the last micro-batch only (DDP's no_sync, forward included, before it)
        with acc.accumulate(policy.module):
            total = 0.0
            for kind, weight in plan.items():
                with PHASES.phase("forward"), saved():
                    loss = policy.loss(kind, current[kind])
                total = total + weight * loss.value
                tokens += loss.tokens
                for name, v in loss.figures.items():
                    figures.setdefault(kind, {}).setdefault(name, []).append(v)
                losses[kind] = losses.get(kind, 0.0) + loss.value.item() / tc.grad_accum
                watched[kind] = watched.get(kind, 0.0) + loss.watched / tc.grad_accum
            with PHASES.phase("backward"):
                acc.backward(total)
        with PHASES.phase("log"):
            for kind, idx in current.items():
                idx = idx if isinstance(idx, list) else idx.items  # an online slot's prompts
                items_log.write({"step": state.step + 1, "objective": kind, "items": idx,
                                 "trained": kind in plan})  # fmt: skip
    with PHASES.phase("log"):  # every rank logs, checks and observes the same values
        losses = session.global_mean(losses)
        watched = session.global_mean(watched)
        figures = {kind: step_figures(session, f) for kind, f in sorted(figures.items())}
    limit = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
    with PHASES.phase("clip"):
        grad_norm = float(acc.clip_grad_norm_(policy.module.parameters(), limit))
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad or not math.isfinite(grad_norm):
        nonfinite(session, state, bad, grad_norm, current)
    else:
        with PHASES.phase("optimizer"):
            state.optimizer.step()
            state.scheduler.step()
        state.schedule.observe(watched)
        for kind in plan:
            state.steps[kind] += 1
    with PHASES.phase("optimizer"):
        state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    step_s = time.time() - t0
    tok_s = tokens / max(step_s, 1e-9)
    timing = step_timing(run, step_s)
    if profile is not None:  # the step's phases (its own metrics lines' writing not included)
        timing |= profile.take(step_s)
    timed = "pref" if "pref" in losses else next(iter(losses), None)
    for kind, v in losses.items():
        log.write({"type": "train", "step": state.step, "objective": kind, "loss": v,
                   "lr": state.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens": tokens, "step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
                   **figures.get(kind, {}), **(timing if kind == timed else {})})  # fmt: skip
    return plan, losses, tok_s


def step_figures(session: Session, per_micro: dict[str, list[float]]) -> dict[str, float]:
    """A slot's figures over the whole step: the mean over its micro-batches and the processes,
    the largest for a `.../max` figure (every rank has the same names: the same plan)."""
    names = sorted(per_micro)
    top = [n for n in names if n.endswith("max")]
    mean = session.global_mean({n: sum(per_micro[n]) / len(per_micro[n]) for n in names
                                if n not in top})  # fmt: skip
    return mean | session.global_max({n: max(per_micro[n]) for n in top})


def step_timing(run: Run, step_s: float) -> dict[str, float]:
    """An online step's seconds and shares: generating, scoring, pi_old's and the reference's
    passes, and training (the rest of the step); {} without an online slot."""
    if run.policy.online is None:
        return {}
    t = run.policy.online.take_timing()
    parts = {
        "generate": t.get("generate", 0.0),
        "score": t.get("score", 0.0),
        "reference": t.get("reference", 0.0) + t.get("old", 0.0),
    }
    parts["train"] = max(step_s - sum(parts.values()), 0.0)
    out = {f"time/{k}_s": round(v, 4) for k, v in parts.items()}
    out |= {f"time/{k}_share": round(v / max(step_s, 1e-9), 4) for k, v in parts.items()}
    return out


def nonfinite(
    session: Session, state: TrainState, bad: list[str], grad_norm: float, batches
) -> None:
    """A NaN / inf loss or gradient norm: stop, naming the step, the objective, the batch's
    items and the last good checkpoint; or, with `on_nonfinite: skip`, skip the update."""
    what = ", ".join(f"{k} loss" for k in bad) or f"gradient norm ({grad_norm})"
    slots = bad or list(batches)
    items = "; ".join(f"data.{k}.train items {batches[k]}" for k in slots)
    if session.cfg.train.on_nonfinite == "skip":
        state.skipped.append(state.step + 1)
        session.console.log(f"step {state.step + 1}: non-finite {what}; skipped ({items})")
        return
    last = latest(session.out)
    raise NonFiniteError(
        f"step {state.step + 1}: non-finite {what} on {items} (0-based, after validation); "
        f"last good checkpoint: {last.path if last else 'none (set train.save_every)'}; "
        "set train.on_nonfinite: skip to skip such steps"
    )


def batch_log(session: Session, state: TrainState) -> MetricsLog:
    """`train.log_batches`: this process's training items (0-based indices of the validated
    training set, as in a non-finite error) of every micro-batch of every stream, a line each."""
    tc = session.cfg.train
    path = session.out / "batches" / f"rank{session.acc.process_index}.jsonl"
    if tc.log_batches:
        path.parent.mkdir(parents=True, exist_ok=True)
    kept = state.step * tc.grad_accum * len(state.streams)  # lines per step are fixed
    return MetricsLog(path, keep=kept, enabled=tc.log_batches)


def signalled(session: Session, stop: Interrupts) -> int | None:
    """The signal any process got (the largest number), the same on every rank."""
    if session.acc.num_processes == 1:
        return stop.requested
    got = session.global_mean({"signal": float(stop.requested or 0)})["signal"]
    return stop.requested or (signal.SIGTERM if got > 0 else None)


def eval_due(cfg: Config, state: TrainState) -> bool:
    return state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps


def evaluate(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> None:
    """The held-out evaluation of this step, logged. A judge that fails (`eval.generate`) ends
    the run with a `JudgeFailedError` naming the judge and this step's checkpoint."""
    t0 = time.time()
    # a fresh run's first evaluation: the policy is the reference model, no forward needed
    at_start = state.step == 0 and state.reference_fp is None
    try:
        figures = run.evaluator.evaluate(at_start=at_start, step=state.step)
    except JudgeError as e:
        raise judge_failed(run, state, log, t_session, e) from None
    state.eval_s += time.time() - t0
    rec = {"type": "eval", "step": state.step, **figures, "steps_sft": state.steps["sft"],
           "steps_pref": state.steps["pref"], "eval_s": round(time.time() - t0, 3),
           "elapsed_s": round(state.train_s + time.time() - t_session, 2)}  # fmt: skip
    log.write(rec)
    state.last_eval = rec


def judge_failed(
    run: Run, state: TrainState, log: MetricsLog, t_session: float, err: JudgeError
) -> JudgeFailedError:
    """The step checkpointed (unless it already is, or none was trained), then the one-line
    error naming the judge, what it answered and the checkpoint to resume from."""
    ev = run.session.cfg.eval
    where = "no step trained yet, nothing checkpointed"
    if state.step > 0:
        last = latest(run.session.out)
        ckpt = last if last and last.step == state.step else save(run, state, log, t_session)
        where = f"step {state.step} checkpointed: {ckpt.path}; resume with --resume"
    reason = " ".join(str(err).split())
    return JudgeFailedError(
        f"eval.judge {ev.judge} failed at the evaluation of step {state.step}: {reason}; {where}"
    )


def switch_reference(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> None:
    """The schedule's reference reset (sequential's preference stage): the current model becomes
    the training reference. With checkpoints on, the model at this point is checkpointed and
    kept, so that a resumed run can recompute these reference log-probs if the cache is gone."""
    session = run.session
    session.console.log(f"{state.schedule.name}: step {state.step}: reference = the current model")
    state.reference_fp = run.refs.switch(run.policy.module)
    if run.policy.online is not None:
        run.policy.online.switch_reference()
    state.reference_step = state.step
    if session.cfg.train.save_every:
        save(run, state, log, t_session)


def save(run: Run, state: TrainState, log: MetricsLog, t_session: float) -> checkpoint.Checkpoint:
    """A checkpoint of this step (`resume.save_step`), with the metrics lines written so far."""
    state.metrics_lines = log.lines
    return save_step(run.session, run.policy.module, state, run.refs, time.time() - t_session)


# ------------------------------------------------------------------------- set-up
def new_state(
    session: Session, ideal: Ideal, online: Online | None = None
) -> tuple[nn.Module, TrainState]:
    """The optimizer and the LR scheduler, the log-prob module and the optimizer prepared by
    Accelerate, the batch streams (an online slot's: its rollouts) and the schedule; returns
    (prepared module, state)."""
    tc, sc = session.cfg.train, session.cfg.schedule
    optimizer = adamw(trainable_parameters(session.model), lr=tc.lr, weight_decay=tc.weight_decay)
    lr_sched = get_scheduler(tc.lr_schedule, optimizer, tc.warmup_steps, tc.max_steps)
    # the LR scheduler stays ours: Accelerate's wrapper steps it once per process per step
    module, optimizer = session.acc.prepare(session.logps, optimizer)
    rank, world = session.acc.process_index, session.acc.num_processes
    if online is not None:
        online.attach(module)
    streams = {
        k: OnlineStream(online) if online is not None and s.kind == "prompts" else
        BatchStream(s.train, tc.batch_size, tc.seed + i, session.partitions.get(k),
                    rank=rank, world=world)
        for i, (k, s) in enumerate(sorted(session.data.items()))
    }  # fmt: skip
    schedule = build_schedule(
        sc.name, sc.options(), lam=sc.lam, total_steps=tc.max_steps, seed=tc.seed,
        loss_sft_star=ideal.loss_sft, loss_pref_star=ideal.loss_pref,
    )  # fmt: skip
    return module, TrainState(optimizer, lr_sched, schedule, streams, online=online)


# -------------------------------------------------------------------------------- helpers
def adamw(params: list, **kw) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (on CPU a 135M-param step: 0.6 s -> 0.09 s)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def _live(losses: dict, ev: dict, tok_s: float) -> str:
    parts = [f"{k}={v:.3f}" for k, v in losses.items()]
    parts += [
        f"f_sft={ev['f_sft']:.3f}" if "f_sft" in ev else "",
        f"f_pref={ev['f_pref']:.3f}" if "f_pref" in ev else "",
        f"{tok_s:.0f} tok/s",
    ]
    return " ".join(p for p in parts if p)
