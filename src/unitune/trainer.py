"""The training loop: one explicit loop on Accelerate for every schedule.

Read top to bottom: load model and data → reference log-probs (cached) → ideal point → optimizer →
for each step: draw one SFT and one preference batch, ask the schedule which objectives run,
compute them, step, and every `eval_every` steps evaluate both objectives on held-out data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import get_scheduler

from unitune import metrics
from unitune.batches import (
    KLPairs,
    Split,
    batch_stream,
    collate_items,
    flatten,
    item_length,
    load_data,
)
from unitune.config import Config, dump_config
from unitune.data import Sequence, collate, data_fingerprint, format_unused, length_batches
from unitune.logprobs import sequence_logps
from unitune.metrics import Ideal
from unitune.models import (
    cache_root,
    load_model,
    model_fingerprint,
    reference_mode,
    save_model,
    trainable_parameters,
)
from unitune.objectives import REGISTRY, FeedbackLogps, PairLogps, SeqLogps
from unitune.objectives.types import desirable
from unitune.parallel import DeltaL1, train_parallel
from unitune.refcache import compute_logps, reference_logps
from unitune.schedules import Sequential, build_schedule


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that its forward returns per-sequence response log-probs.

    Accelerate prepares this wrapper (DDP/FSDP hooks then see every forward), and the LM head is
    applied only at response positions, in chunks (see `logprobs.py`).
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, target_mask, objective_forward=None, **params):
        """Summed log-probs per row; or, for an objective with its own model pass (IFT), that
        pass's output (`objective_forward(model, ..., chunk_size=, **params)`)."""
        if objective_forward is not None:
            return objective_forward(
                self.model, input_ids, attention_mask, target_mask,
                chunk_size=self.chunk_size, **params,
            )  # fmt: skip
        return sequence_logps(
            self.model, input_ids, attention_mask, target_mask, chunk_size=self.chunk_size
        )


class Run:
    """State of one training run; `train()` below drives it."""

    def __init__(self, cfg: Config, console: Console | None = None, progress: bool = True):
        self.cfg, self.console, self.show_progress = cfg, console or Console(), progress
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
        self.out = Path(cfg.output_dir)

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        # Accelerate keeps one process-wide state and refuses a second Accelerator with another
        # precision; a later run in the same process (a sweep, the demo, a notebook) may differ.
        # The distributed part (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=False)
        self.device = self.acc.device
        self.model, self.tokenizer = load_model(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.data = load_data(cfg, self.tokenizer)
        report_data(self)
        self.sft_obj = REGISTRY[cfg.objectives.sft.name]
        self.pref_obj = REGISTRY[cfg.objectives.pref.name]
        for kind, obj in (("sft", self.sft_obj), ("pref", self.pref_obj)):
            if obj.kind != kind:
                raise ValueError(f"objectives.{kind}: {obj.name!r} is a {obj.kind} objective")
        self.objectives = {
            slot: (obj, getattr(cfg.objectives, slot).params(), self.data[slot])
            for slot, obj in (("sft", self.sft_obj), ("pref", self.pref_obj))
            if slot in self.data
        }
        self.beta = cfg.eval.beta  # f_pref and the reward margin, whatever the objective
        if "pref" in self.data and self.pref_obj.needs_kl:
            # fixed partitions, so that each batch's mismatched pairs are known and cached
            split = self.data["pref"]
            lengths = [item_length(f) for f in split.train]
            self.partition = length_batches(
                lengths, cfg.train.batch_size, seed=cfg.train.seed, shuffle=True
            )
            self.kl = {
                "train": KLPairs.build(split.train, self.partition),
                "eval": KLPairs.build(split.eval, self._eval_batches(split.eval)),
            }
        self.policy = PolicyLogps(self.model, cfg.train.logprob_chunk_size).to(self.device)
        # PAFT's L1 penalty on the SFT objective's delta from the starting weights, copied once
        # the model is on its device
        self.l1 = DeltaL1(self.model) if cfg.schedule.l1 > 0 else None
        self.refs: dict[str, torch.Tensor] = {}
        self.extras: dict[str, dict[str, float]] = {}  # per-slot figures of the last step
        self.compute_references(initial=True)

    def compute_references(self, *, initial: bool) -> None:
        """Reference log-probs for the training sets whose objective needs them; on the initial
        call also for the eval sets (the metrics' fixed starting reference).

        Initially the reference is the starting model (LoRA: adapters disabled). Later calls
        (sequential's preference stage) take the current model, adapters included, as reference.
        """
        # the precision is part of the key: bf16 log-probs differ from fp32 ones
        fp = f"{model_fingerprint(self.model, adapters=not initial)}|{self.acc.mixed_precision}"
        wanted = []
        if "sft" in self.data and self.sft_obj.needs_ref:
            wanted.append(("sft_train", self.data["sft"].train))
        if "pref" in self.data and self.pref_obj.needs_ref:
            wanted.append(("pref_train", self.data["pref"].train))
        if "pref" in self.data and self.pref_obj.needs_kl:
            wanted.append(("pref_train_kl", self.kl["train"].seqs))
        if initial:
            wanted += [(f"{k}_eval", s.eval) for k, s in self.data.items()]
            if "pref" in self.data and self.pref_obj.needs_kl:
                wanted.append(("pref_eval_kl", self.kl["eval"].seqs))
        ref_ctx = reference_mode(self.model) if initial else nullcontext()
        with ref_ctx, self.acc.autocast():
            for name, items in wanted:
                self.refs[name], hit = reference_logps(
                    self.policy,
                    flatten(items),
                    model_fp=fp,
                    cache_dir=self.cache_dir,
                    pad_id=self.pad_id,
                    batch_size=self.cfg.train.eval_batch_size,
                    device=self.device,
                )
                self.console.log(
                    f"reference log-probs {name}: {'cache hit' if hit else 'computed'}"
                    f" ({len(items)} items)"
                )

    # ------------------------------------------------------------ objectives
    def objective_input(self, slot: str, stage: str, idx: list[int]):
        """The log-probs the objective of `slot` consumes, on items `idx` of `stage` (train/eval):
        `SeqLogps`, `PairLogps`, `FeedbackLogps`, or its own forward's output (IFT)."""
        obj, params, split = self.objectives[slot]
        items = split.train if stage == "train" else split.eval
        batch = collate_items(items, idx, self.pad_id, self.device)
        if obj.forward is not None:
            return self.policy(**batch, objective_forward=obj.forward, **params.model_dump())
        logp, n = self.policy(**batch)  # pairs: one forward over chosen and rejected together
        ref = self.refs.get(f"{slot}_{stage}")

        def seq(rows: slice, ref_idx: list[int]) -> SeqLogps:
            r = ref[ref_idx].to(logp.device) if ref is not None else None
            return SeqLogps(logp[rows], n[rows], r)

        b = len(idx)
        if split.kind == "pairs":
            m = len(items)
            return PairLogps(seq(slice(0, b), idx), seq(slice(b, 2 * b), [i + m for i in idx]))
        if split.kind == "demonstrations":
            return seq(slice(0, b), idx)
        target = torch.tensor([items[i].target for i in idx], device=logp.device)
        kl = self.kl_logps(stage, idx) if obj.needs_kl else None
        return FeedbackLogps(seq(slice(0, b), idx), target, kl)

    @torch.no_grad()
    def kl_logps(self, stage: str, idx: list[int]) -> SeqLogps:
        """KTO's mismatched pairs of this batch: policy log-probs (no grad, as TRL) and cached
        reference log-probs."""
        pairs = self.kl[stage]
        start = pairs.offset[tuple(idx)]
        rows = slice(start, start + len(idx))
        batch = {k: v.to(self.device) for k, v in collate(pairs.seqs[rows], self.pad_id).items()}
        logp, n = self.policy(**batch)
        return SeqLogps(logp, n, self.refs[f"pref_{stage}_kl"][rows].to(logp.device))

    def loss(self, slot: str, idx: list[int]) -> tuple[torch.Tensor, int]:
        """The training objective of `slot` on the batch `idx`; returns (loss, tokens processed)."""
        obj, params, split = self.objectives[slot]
        lp = self.objective_input(slot, "train", idx)
        n_tok = sum(len(s.input_ids) for s in flatten([split.train[i] for i in idx]))
        if isinstance(lp, FeedbackLogps) and lp.kl is not None:  # KTO's batch KL estimate z
            self.extras[slot] = {"kl": float(lp.kl.ratio.mean().clamp(min=0))}
        loss = obj.loss(lp, params)
        if slot == "sft" and self.l1 is not None:
            norm = self.l1()
            self.extras[slot] = {"l1_norm": norm.item()}
            loss = loss + self.cfg.schedule.l1 * norm
        return loss, n_tok

    @torch.no_grad()
    def probe(self, batches: dict[str, list[int]]) -> dict[str, float]:
        """No-grad losses of both objectives on the current batches (MAXRIGHT's refresh)."""
        self.policy.eval()
        try:
            return {kind: float(self.loss(kind, idx)[0]) for kind, idx in batches.items()}
        finally:
            self.policy.train()

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (`metrics.py`) and each objective's own held-out loss."""
        self.policy.eval()
        out: dict[str, float] = {}
        bs = self.cfg.train.eval_batch_size
        try:
            with self.acc.autocast():  # the training precision, as for the reference log-probs
                if "sft" in self.data:
                    seqs = self.data["sft"].eval
                    logp, n = self._all_logps(seqs, bs)
                    out |= metrics.sft_metrics(SeqLogps(logp, n, self.refs["sft_eval"]))
                if "pref" in self.data and self.data["pref"].kind == "pairs":
                    pairs = self.data["pref"].eval
                    logp, n = self._all_logps(flatten(pairs), bs)
                    ref, m = self.refs["pref_eval"], len(pairs)
                    pair = PairLogps(
                        SeqLogps(logp[:m], n[:m], ref[:m]), SeqLogps(logp[m:], n[m:], ref[m:])
                    )
                    out |= metrics.pref_metrics(pair, self.beta)
                if "pref" in self.data and self.data["pref"].kind == "unpaired":
                    out |= self._feedback_metrics(bs)
                for slot in self.data:
                    if not self.cfg.own_loss_is_metric(slot):  # else it is f_sft / f_pref
                        out[self.cfg.own_loss_key(slot)] = self._own_loss(slot)
        finally:
            self.policy.train()
        if "f_sft" in out and "f_pref" in out:
            out["ideal_distance"] = metrics.ideal_distance(
                out["f_sft"], out["f_pref"], self.ideal.f_sft, self.ideal.f_pref
            )
        return out

    def _eval_batches(self, items: list) -> list[list[int]]:
        lengths = [item_length(it) for it in items]
        return length_batches(lengths, self.cfg.train.eval_batch_size, seed=0, shuffle=False)

    def _own_loss(self, slot: str) -> float:
        """The objective's own loss on held-out data: batch losses weighted by batch size."""
        obj, params, split = self.objectives[slot]
        total = 0.0
        for idx in self._eval_batches(split.eval):
            lp = self.objective_input(slot, "eval", idx)
            total += float(obj.loss(lp, params)) * len(idx)
        return total / len(split.eval)

    def _feedback_metrics(self, bs: int) -> dict[str, float]:
        """Unpaired feedback: the logistic `f_pref`, reward accuracy and margin at `eval.beta`
        (`metrics.feedback_metrics`), and KTO's KL estimate."""
        obj, params, split = self.objectives["pref"]
        items = split.eval
        logp, n = self._all_logps(flatten(items), bs)
        good = desirable(torch.tensor([f.target for f in items]))
        out = metrics.feedback_metrics(SeqLogps(logp, n, self.refs["pref_eval"]), good, self.beta)
        if obj.needs_kl:
            ratios = [self.kl_logps("eval", idx).ratio for idx in self._eval_batches(items)]
            out["kl"] = float(torch.cat(ratios).mean().clamp(min=0))
        return out

    def _all_logps(self, seqs: list[Sequence], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = compute_logps(
            self.policy, seqs, pad_id=self.pad_id, batch_size=bs, device=self.device
        )
        n = torch.tensor([sum(s.target_mask) for s in seqs])
        return logp, n


# ---------------------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    *,
    console: Console | None = None,
    progress: bool = True,
    ideal: Ideal | None = None,
) -> dict:
    """Run one training job described by `cfg`; returns the summary written to summary.json."""
    if cfg.schedule.name == "parallel":  # two runs and a merge, not a per-step schedule
        return train_parallel(cfg, console=console, progress=progress, ideal=ideal)
    run = Run(cfg, console, progress)
    con = run.console
    t_start = time.time()
    run.setup()
    run.ideal = ideal if ideal is not None else resolve_ideal(cfg, con)

    tc, sc = cfg.train, cfg.schedule
    params = trainable_parameters(run.model)
    optimizer = adamw(params, lr=tc.lr, weight_decay=tc.weight_decay)
    lr_sched = get_scheduler(tc.lr_schedule, optimizer, tc.warmup_steps, tc.max_steps)
    run.policy, optimizer, lr_sched = run.acc.prepare(run.policy, optimizer, lr_sched)

    streams = {
        k: batch_stream(
            s.train,
            tc.batch_size,
            tc.seed + i,
            getattr(run, "partition", None) if k == "pref" else None,
        )
        for i, (k, s) in enumerate(sorted(run.data.items()))
    }
    current: dict[str, list[int]] = {}
    schedule = build_schedule(
        sc.name,
        lam=sc.lam,
        total_steps=tc.max_steps,
        seed=tc.seed,
        k=sc.k,
        f_sft_star=run.ideal.loss_sft,  # MAXRIGHT's gaps are in the objectives' own losses
        f_pref_star=run.ideal.loss_pref,
        probe=lambda: run.probe(current),
    )

    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(dump_config(cfg))
    log = (run.out / "metrics.jsonl").open("w")
    steps = Counter()

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    def eval_record(step: int) -> dict:
        rec = {
            "type": "eval",
            "step": step,
            **run.evaluate(),
            "steps_sft": steps["sft"],
            "steps_pref": steps["pref"],
            "elapsed_s": round(time.time() - t_train, 2),
        }
        write(rec)
        return rec

    t_train = time.time()
    last_eval = eval_record(0)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=con,
        disable=not progress,
    )
    task = bar.add_task(f"{cfg.name or sc.name}", total=tc.max_steps, info="")
    tokens, t_tok = 0, time.time()
    with bar:
        for step in range(tc.max_steps):
            if isinstance(schedule, Sequential) and step == schedule.switch_step and step > 0:
                con.log(f"sequential: preference stage from step {step}; reference = current model")
                run.compute_references(initial=False)
            plan = None
            step_losses: dict[str, float] = {}
            for _ in range(tc.grad_accum):
                for kind, stream in streams.items():
                    current[kind] = next(stream)
                if plan is None:
                    plan = schedule.plan(step)  # MAXRIGHT probes the first micro-batches
                total = 0.0
                for kind, weight in plan.items():
                    loss, n_tok = run.loss(kind, current[kind])
                    total = total + weight * loss
                    tokens += n_tok
                    step_losses[kind] = step_losses.get(kind, 0.0) + loss.item() / tc.grad_accum
                run.acc.backward(total / tc.grad_accum)
            if tc.max_grad_norm is not None:
                run.acc.clip_grad_norm_(run.policy.parameters(), tc.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.observe(step_losses)
            for kind in plan:
                steps[kind] += 1
            tok_s = tokens / max(time.time() - t_tok, 1e-9)
            for kind, v in step_losses.items():
                write(
                    {
                        "type": "train",
                        "step": step + 1,
                        "objective": kind,
                        "loss": v,
                        "lr": lr_sched.get_last_lr()[0],
                        "tokens_per_s": round(tok_s, 1),
                        **run.extras.pop(kind, {}),
                    }
                )
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.max_steps:
                last_eval = eval_record(step + 1)
            bar.update(task, advance=1, info=_live(plan, step_losses, last_eval, tok_s))
    log.close()

    wall = time.time() - t_start
    summary = run_summary(
        cfg,
        run.ideal,
        last_eval,
        wall_s=wall,
        train_s=time.time() - t_train,
        steps={"sft": steps["sft"], "pref": steps["pref"]},
        data={k: _report_dict(s) for k, s in run.data.items()},
    )
    if tc.save_model and run.acc.is_main_process:
        merge = bool(cfg.model.lora and cfg.model.lora.merge_on_save)
        save_model(
            run.acc.unwrap_model(run.policy).model,
            run.tokenizer,
            run.out / "model",
            merge_lora=merge,
        )
    atomic_write(run.out / "summary.json", json.dumps(summary, indent=2))
    return summary


def run_summary(
    cfg: Config,
    star: Ideal,
    final: dict,
    *,
    wall_s: float,
    train_s: float,
    steps: dict[str, int],
    data: dict,
    **extra,
) -> dict:
    """A run's summary.json (docs/ARCHITECTURE.md, "Run directory"); `extra` keys go after
    `final`."""
    sc = cfg.schedule
    return {
        "name": cfg.name or sc.name,
        "schedule": sc.name,
        "lam": sc.lam,
        "seed": cfg.train.seed,
        "sft_objective": cfg.objectives.sft.name,
        "pref_objective": cfg.objectives.pref.name,
        "f_sft_star": star.f_sft,
        "f_pref_star": star.f_pref,
        "loss_sft_star": star.loss_sft,
        "loss_pref_star": star.loss_pref,
        "measures": metrics.measures(data.get("pref", {}).get("kind"), cfg.eval.beta),
        "final": {k: v for k, v in final.items() if k != "type"},
        **extra,
        "wall_s": round(wall_s, 2),
        "train_s": round(train_s, 2),
        "steps": steps,
        "data": data,
    }


def adamw(params: list, **kw) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (on CPU a 135M-param step: 0.6 s -> 0.09 s)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def _live(plan: dict, losses: dict, ev: dict, tok_s: float) -> str:
    parts = [f"{k}={v:.3f}" for k, v in losses.items()]
    parts += [
        f"f_sft={ev['f_sft']:.3f}" if "f_sft" in ev else "",
        f"f_pref={ev['f_pref']:.3f}" if "f_pref" in ev else "",
        f"{tok_s:.0f} tok/s",
    ]
    return " ".join(p for p in parts if p)


def _report_dict(split: Split) -> dict:
    out = {"kind": split.kind, "train": len(split.train), "eval": len(split.eval)}
    for name, rep in (("train_report", split.report), ("eval_report", split.eval_report)):
        if rep is not None:
            out[name] = {
                "records": rep.n_records,
                "kept": rep.n_kept,
                "skipped": rep.skipped,
                "truncated": rep.truncated,
                "unused_columns": dict(rep.unused_columns),
            }
    return out


def report_data(run: Run) -> None:
    for kind, split in run.data.items():
        for rep in (split.report, split.eval_report):
            if rep is None:
                continue
            msg = f"{kind}: {rep.source}: {rep.n_kept}/{rep.n_records} records"
            if rep.skipped:
                msg += f", skipped {sum(rep.skipped.values())} ({dict(rep.skipped)})"
            if rep.truncated:
                msg += f", truncated {rep.truncated} to max_length={run.cfg.data.max_length}"
            if rep.unused_columns:
                msg += f", unused columns: {format_unused(rep.unused_columns)}"
            run.console.log(msg)
        run.console.log(f"{kind}: {len(split.train)} train / {len(split.eval)} eval")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ the ideal point
CALIBRATION_VERSION = "2"  # 2: own-loss optima, keyed by model and data fingerprints


def resolve_ideal(cfg: Config, console: Console) -> Ideal:
    """The ideal point from the config, from a (cached) calibration, or 0."""
    sc = cfg.schedule
    if sc.ideal == "config":
        f_sft, f_pref = float(sc.f_sft_star), float(sc.f_pref_star)
        return Ideal(
            f_sft,
            f_pref,
            sc.loss_sft_star if sc.loss_sft_star is not None else f_sft,
            sc.loss_pref_star if sc.loss_pref_star is not None else f_pref,
        )
    if sc.ideal == "calibrate":
        return calibrate(cfg, console)
    return Ideal()


def input_fingerprint(cfg: Config, console: Console) -> str:
    """sha256 of the starting model's weights and of every tokenized dataset (the reference
    cache's fingerprints): a data file or a local model edited in place changes it."""
    model, tokenizer = load_model(cfg.model)
    parts = [model_fingerprint(model), cfg.model.dtype]
    data = load_data(cfg, tokenizer)
    for kind, split in sorted(data.items()):
        parts += [kind, *(data_fingerprint(flatten(items)) for items in (split.train, split.eval))]
    console.log("calibration key: fingerprints of the model and the data")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def calibrate(cfg: Config, console: Console | None = None, progress: bool = False) -> Ideal:
    """Short single-objective runs (SFT only, preference only). The best held-out value of each
    metric is `f*`, the best held-out value of each objective's own loss is `loss*` (MAXRIGHT's
    gaps compare like with like). Cached by the settings and the model's and data's fingerprints.
    """
    console = console or Console()
    relevant = cfg.model_copy(update={"name": None, "output_dir": "", "schedule": None})
    key = hashlib.sha256(
        (
            f"v{CALIBRATION_VERSION}|{dump_config(relevant)}|{cfg.schedule.calibration_steps}|"
            f"{input_fingerprint(cfg, console)}"
        ).encode()
    ).hexdigest()[:24]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
    path = cache_dir / "calibration" / f"{key}.json"
    if path.exists():
        star = Ideal(**json.loads(path.read_text()))
        console.log(f"ideal point from calibration cache: {star}")
        return star
    best: dict[str, float] = {}
    for kind in ("sft", "pref"):
        sub = cfg.model_copy(deep=True)
        sub.name = f"calibrate-{kind}"
        # each objective alone, as it is: no PAFT penalty on the SFT one
        sub.schedule = sub.schedule.model_copy(update={"name": kind, "ideal": "zero", "l1": 0.0})
        steps = cfg.schedule.calibration_steps  # only the best value is needed: 3 evaluations
        sub.train = sub.train.model_copy(
            update={"max_steps": steps, "eval_every": max(steps // 2, 1), "save_model": False}
        )
        sub.output_dir = str(path.parent / f"{key}-{kind}")
        console.log(f"calibrating f_{kind}*: {kind} alone for {sub.train.max_steps} steps")
        train(sub, console=console, progress=progress, ideal=Ideal())
        evals = [json.loads(line) for line in (Path(sub.output_dir) / "metrics.jsonl").open()]
        evals = [e for e in evals if e["type"] == "eval"]
        best[f"f_{kind}"] = min(e[f"f_{kind}"] for e in evals)
        best[f"loss_{kind}"] = min(e[cfg.own_loss_key(kind)] for e in evals)
    star = Ideal(**best)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(star)))
    console.log(f"ideal point: {star}")
    return star
