"""The `reward_model` job: a Bradley–Terry reward model trained on the pairs of `data.pref`.

The model is the run's causal LM as `AutoModelForSequenceClassification` with one output
(`models/classifier.py`), full or LoRA; the reward of a sequence is its forward's `logits[:, 0]`
(the last non-pad token, pooled by transformers), the loss `objectives.reward.bradley_terry` on
each pair's chosen and rejected full sequences. Held-out pairs give the eval lines: the same loss,
the pairwise accuracy (fraction with r_chosen > r_rejected) and the mean margin.

The run directory is every run's (`rundir.py`: lock, config.yaml, metrics.jsonl, summary.json);
checkpoints are `checkpoint.save_checkpoint`'s, holding the model (or adapter and head), the
optimizer, the LR scheduler, the batch position and the RNG states, so that a resumed run ends
bitwise equal to the uninterrupted one. The trained model is saved to `<output_dir>/model/` as a
plain transformers directory (LoRA merged) with its tokenizer and its model card
(`modelcard.reward_model_card`): `rm:<output_dir>/model` scores with it. With
`train.push_to_hub` it is uploaded as every run's model is (`hub.push_model`, the token checked
before training).
"""

from __future__ import annotations

import contextlib
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
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from rich.console import Console
from transformers import get_scheduler

from unitune.config import Config, dump_config
from unitune.core import usage
from unitune.core.interrupts import Interrupted, Interrupts
from unitune.core.io import atomic_write
from unitune.core.progress import ProgressBar
from unitune.data import DataError, collate, detect_kind, length_batches
from unitune.judges.reward_model import READS_DATA, READS_KEY
from unitune.models.classifier import load_sequence_classifier
from unitune.models.save import save_model
from unitune.objectives.reward import bradley_terry
from unitune.training import checkpoint, engines
from unitune.training.batches import BatchStream, Split, flatten, item_length, load_data
from unitune.training.hub import push_model, require_token
from unitune.training.loop import NonFiniteError
from unitune.training.modelcard import write_model_card
from unitune.training.resume import (
    ResumeError,
    config_changes,
    find_checkpoint,
    latest,
    resumable_keys,
    with_defaults,
)
from unitune.training.rundir import MetricsLog, report_data, report_dict
from unitune.training.state import TrainState

JOB = "reward_model"


@dataclass
class RewardState:
    """Everything of a reward-model run that changes, saved whole in every checkpoint (the model,
    optimizer and scheduler beside it, as `checkpoint.save_checkpoint` writes them)."""

    stream: BatchStream
    step: int = 0
    tokens: int = 0
    skipped: list[int] = field(default_factory=list)
    last_eval: dict[str, Any] = field(default_factory=dict)
    metrics_lines: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped": list(self.skipped),
            "last_eval": self.last_eval,
            "metrics_lines": self.metrics_lines,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "stream": self.stream.state_dict(),
            "python_rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        self.last_eval, self.metrics_lines = dict(state["last_eval"]), state["metrics_lines"]
        self.train_s, self.eval_s = float(state["train_s"]), float(state["eval_s"])
        self.stream.load_state_dict(state["stream"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["cuda_rng"])


def check_pairs(cfg: Config) -> None:
    """Before any model loads: `data.pref` holds pairs, not unpaired feedback (a `DataError`
    naming the file)."""
    dcfg = cfg.data.pref
    assert dcfg is not None  # Config._reward_model_job
    if dcfg.format != "auto":
        return  # a named format is a pairs format (load_data checks it)
    for source in (dcfg.train, dcfg.eval):
        if source is None:
            continue
        if detect_kind(source, split=dcfg.split, columns=dcfg.columns) != "pairs":
            raise DataError(
                source, None, None,
                f"job {JOB} needs preference pairs (prompt, chosen, rejected), but this holds "
                "unpaired feedback (label or score)",
            )  # fmt: skip


def rewards(model: Any, pairs: list, pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The rewards of the pairs' chosen and rejected sequences: the model's `logits[:, 0]`."""
    batch = collate(flatten(pairs), pad_id)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    r = logits[:, 0].float()
    return r[: len(pairs)], r[len(pairs) :], batch["attention_mask"].sum()


def pair_figures(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (r_chosen > r_rejected) and mean margin of a set of pairs."""
    margin = (r_chosen - r_rejected).detach()
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


def evaluate(model: Any, items: list, pad_id: int, device: torch.device, batch: int) -> dict:
    """The held-out loss, pairwise accuracy and mean margin over every held-out pair."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        order = length_batches([item_length(it) for it in items], batch, seed=0, shuffle=False)
        for idx in order:
            rc, rr, _ = rewards(model, [items[i] for i in idx], pad_id, device)
            chosen.append(rc)
            rejected.append(rr)
    model.train(was)
    rc, rr = torch.cat(chosen), torch.cat(rejected)
    return {"loss": bradley_terry(rc, rr).item(), **pair_figures(rc, rr), "pairs": len(rc)}


def accelerator(cfg: Config) -> Accelerator:
    """One process or DDP (`torchrun` / `accelerate launch`); a sharding engine is refused."""
    AcceleratorState._reset_state(reset_partial_state=False)  # another run's accumulation
    acc = engines.accelerator(cfg)
    engine = engines.Engine.of(acc)
    if engine.kind not in ("single", "ddp"):
        raise engines.EngineError(
            f"job {JOB} runs on one process or DDP, not {engine.describe()}; launch it with "
            "torchrun or a plain multi-process accelerate config"
        )
    return acc


def global_mean(acc: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """`values` averaged over the processes (every rank logs and decides on the same)."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction="sum").cpu() / acc.num_processes
    return dict(zip(values, t.tolist(), strict=True))


def train_reward_model(
    cfg: Config,
    *,
    console: Console | None = None,
    progress: bool = True,
    resume: bool | str | Path = False,
) -> dict:
    """Train the reward model `cfg` describes; returns the summary written to summary.json.

    `resume`: True for the newest valid checkpoint of `cfg.output_dir`, or a checkpoint path.
    On several processes (DDP) each draws its own batches (`BatchStream`'s rank / world) and the
    gradients are averaged, so 2 processes equal 1 with `grad_accum: 2`; every process scores
    the held-out pairs (they hold the same weights) and the main one writes every file.
    Raises `Interrupted` after checkpointing on SIGTERM / SIGINT, `NonFiniteError`, `DataError`,
    `ModelLoadError`, `ResumeError`, `checkpoint.CheckpointError`, and `HubError` when
    `train.push_to_hub` has no token (before training) or the upload fails (the model kept)."""
    con = console or Console()
    t_start, tc, out = time.time(), cfg.train, Path(cfg.output_dir)
    if tc.push_to_hub:
        require_token()  # before anything is trained
    check_pairs(cfg)
    usage.reset_peaks()
    acc = accelerator(cfg)
    device, main = acc.device, acc.is_main_process
    if not main:
        con.quiet = True
    with Interrupts() as stop:
        torch.manual_seed(tc.seed)  # the new head's initial weights
        with acc.main_process_first():  # a builtin's directory is written to the cache once
            model, tokenizer = load_sequence_classifier(cfg.model)
        model.to(device).train()
        split = load_pairs(cfg, tokenizer)
        report_data({"pref": split}, con, cfg.data.max_length)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        scheduler = get_scheduler(
            tc.lr_schedule, optimizer, num_warmup_steps=tc.warmup_steps,
            num_training_steps=tc.max_steps,
        )  # fmt: skip
        stream = BatchStream(split.train, tc.batch_size, tc.seed, rank=acc.process_index,
                             world=acc.num_processes)  # fmt: skip
        state = RewardState(stream)
        if resume:
            ckpt = find_checkpoint(out, resume, con)
            restore(cfg, model, optimizer, scheduler, state, ckpt, con)
            acc.wait_for_everyone()  # every process has read it before the main one prunes
            if main:
                for later in checkpoint.list_checkpoints(out):
                    if checkpoint.step_of(later) > ckpt.step:  # a future this resume replaces
                        shutil.rmtree(later)
        elif main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.yaml", dump_config(cfg))
        trained = acc.prepare(model)  # DDP on several processes; `model` stays the bare one
        pad_id = tokenizer.pad_token_id
        log = MetricsLog(out / "metrics.jsonl", keep=state.metrics_lines, enabled=main)
        t_session = time.time()

        def eval_now() -> None:
            t0 = time.time()
            figures = evaluate(model, split.eval, pad_id, device, tc.eval_batch_size)
            state.eval_s += time.time() - t0
            rec = {"type": "eval", "step": state.step, **figures,
                   "eval_s": round(time.time() - t0, 3),
                   "elapsed_s": round(state.train_s + time.time() - t_session, 2)}  # fmt: skip
            log.write(rec)
            state.last_eval = rec

        def save() -> checkpoint.Checkpoint:
            snapshot = state.state_dict()
            snapshot["metrics_lines"] = log.lines
            snapshot["train_s"] += time.time() - t_session
            path = checkpoint.step_path(out, state.step)
            if main:  # one writer; the others wait until it is in place
                path = checkpoint.save_checkpoint(
                    out, state.step, model=model, optimizer=optimizer, scheduler=scheduler,
                    state={"config": cfg.model_dump(mode="json"), "state": snapshot},
                    tensors=TrainState.rng_tensors(), keep_last=tc.keep_last,
                )  # fmt: skip
                con.log(f"checkpoint step {state.step}: {path}")
            acc.wait_for_everyone()
            return checkpoint.Checkpoint(path, state.step, {})

        bar = ProgressBar(cfg.name or JOB, tc.max_steps, console=con, enabled=progress)
        try:
            with bar:
                bar.update(completed=state.step)
                if not state.last_eval or state.last_eval["step"] < state.step:
                    eval_now()
                while state.step < tc.max_steps:
                    line = train_step(cfg, acc, trained, params, optimizer, scheduler, state,
                                      split.train, pad_id)  # fmt: skip
                    log.write(line)
                    if state.step % tc.eval_every == 0 or state.step == tc.max_steps:
                        eval_now()
                    state.metrics_lines = log.lines
                    signum = signalled(acc, stop)  # every rank stops at the same step
                    if signum or (tc.save_every and state.step % tc.save_every == 0):
                        save()
                    if signum:
                        raise Interrupted(signum, checkpoint=latest(out))
                    ev = state.last_eval
                    bar.advance(info=f"loss={line['loss']:.3f} eval_acc={ev['accuracy']:.2f}")
        finally:
            log.close()
    train_s = state.train_s + time.time() - t_session
    summary = {
        "name": cfg.name or JOB,
        "job": JOB,
        "model": cfg.model.name,
        "lora": cfg.model.lora is not None,
        "seed": tc.seed,
        "final": {k: v for k, v in state.last_eval.items() if k != "type"},
        "eval_s": round(state.eval_s, 2),
        **usage.costs(state.tokens, train_s - state.eval_s, device),
        "wall_s": round(time.time() - t_start, 2),
        "train_s": round(train_s, 2),
        "steps": {JOB: state.step},
        "data": {"pref": report_dict(split)},
        "skipped_nonfinite": state.skipped,
        "world_size": acc.num_processes,
        "global_batch": tc.batch_size * acc.num_processes * tc.grad_accum,
    }
    if tc.save_model and main:
        # rm:PATH reads what it trained on: the data loader's tokens (judges/reward_model.py)
        setattr(model.config, READS_KEY, READS_DATA)
        save_model(model, tokenizer, out / "model", merge_lora=True)
        write_model_card(out / "model", cfg, summary)  # README.md, beside the weights
    if main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    if tc.push_to_hub and tc.save_model and main:
        url = push_model(out / "model", tc.push_to_hub, private=tc.hub_private, run_dir=out)
        con.log(f"pushed {out / 'model'} to {url}")
    return summary


def signalled(acc: Accelerator, stop: Interrupts) -> int | None:
    """The signal any process got, the same on every rank."""
    if acc.num_processes == 1:
        return stop.requested
    got = global_mean(acc, {"signal": float(stop.requested or 0)})["signal"]
    return stop.requested or (signal.SIGTERM if got > 0 else None)


def load_pairs(cfg: Config, tokenizer: Any) -> Split:
    """`data.pref`'s train and held-out pairs, through the loaders every run uses."""
    split = load_data(cfg, tokenizer)["pref"]  # as pairs: the default pref objective's kind
    if not len(split.train) or not len(split.eval):
        which = "train" if not len(split.train) else "held-out"
        raise DataError(cfg.data.pref.train, None, None, f"no {which} pairs left after validation")
    return split


def train_step(
    cfg: Config,
    acc: Accelerator,
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: RewardState,
    items: list,
    pad_id: int,
) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches (the processes' gradients averaged on
    the last, DDP's `no_sync` before it); returns its train line, averaged over the processes."""
    tc, t0 = cfg.train, time.time()
    loss_sum, chosen, rejected, tokens = 0.0, [], [], 0
    for micro in range(tc.grad_accum):
        idx = next(state.stream)
        last = micro == tc.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            rc, rr, n_tokens = rewards(model, [items[i] for i in idx], pad_id, acc.device)
            loss = bradley_terry(rc, rr)
            (loss / tc.grad_accum).backward()
        loss_sum += loss.item() / tc.grad_accum
        chosen.append(rc.detach())
        rejected.append(rr.detach())
        tokens += int(n_tokens)
    figures = global_mean(
        acc, {"loss": loss_sum, **pair_figures(torch.cat(chosen), torch.cat(rejected))}
    )
    tokens = round(global_mean(acc, {"tokens": float(tokens)})["tokens"] * acc.num_processes)
    limit = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if not (math.isfinite(figures["loss"]) and math.isfinite(grad_norm)):
        if tc.on_nonfinite == "error":
            raise NonFiniteError(
                f"step {state.step + 1}: non-finite loss ({figures['loss']}) or gradient norm "
                f"({grad_norm}); set train.on_nonfinite: skip to skip such steps"
            )
        state.skipped.append(state.step + 1)
    else:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    return {"type": "train", "step": state.step, "objective": "bradley_terry", **figures,
            "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": tokens,
            "step_s": round(time.time() - t0, 4)}  # fmt: skip


def restore(
    cfg: Config,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: RewardState,
    ckpt: checkpoint.Checkpoint,
    con: Console,
) -> None:
    """Model, optimizer, scheduler, batch position and RNGs from `ckpt`, after checking that
    the config differs from the checkpoint's only in resumable keys."""
    saved = json.loads((Path(ckpt.path) / "state.json").read_text())
    changed = config_changes(with_defaults(saved["config"]), cfg.model_dump(mode="json"))
    if changed:
        raise ResumeError(
            f"--resume {ckpt.path}: the config differs from the checkpoint's in "
            f"{'; '.join(changed)}; only {', '.join(resumable_keys())} may change"
        )
    if saved["config"]["train"]["max_steps"] != cfg.train.max_steps and (
        cfg.train.lr_schedule != "constant"
    ):
        raise ResumeError(
            f"--resume {ckpt.path}: train.max_steps changed with lr_schedule "
            f"{cfg.train.lr_schedule!r}; resume with the same max_steps"
        )
    saved_state, tensors = checkpoint.load_checkpoint(
        ckpt, model=model, optimizer=optimizer, scheduler=scheduler
    )
    state.load_state_dict(saved_state["state"], tensors)
    con.log(f"resumed from {ckpt.path} at step {state.step}")
