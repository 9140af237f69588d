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
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from transformers import get_scheduler

from unitune import metrics
from unitune.config import Config, dump_config
from unitune.data import (
    DataReport,
    Pair,
    Sequence,
    collate,
    length_batches,
    load_preference,
    load_sft,
    split_holdout,
)
from unitune.logprobs import sequence_logps
from unitune.models import (
    cache_root,
    load_model,
    model_fingerprint,
    reference_mode,
    save_model,
    trainable_parameters,
)
from unitune.objectives import REGISTRY, PairLogps, SeqLogps
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

    def forward(self, input_ids, attention_mask, target_mask):
        return sequence_logps(
            self.model, input_ids, attention_mask, target_mask, chunk_size=self.chunk_size
        )


@dataclass
class Split:
    train: list
    eval: list
    report: DataReport | None = None
    eval_report: DataReport | None = None


def load_data(cfg: Config, tokenizer) -> dict[str, Split]:
    """Load, validate and tokenize every dataset before training starts."""
    out: dict[str, Split] = {}
    kw = {"max_length": cfg.data.max_length, "on_bad_record": cfg.data.on_bad_record}
    for kind, loader in (("sft", load_sft), ("pref", load_preference)):
        dcfg = getattr(cfg.data, kind)
        if dcfg is None:
            continue
        kw["columns"] = dcfg.columns
        train, report = loader(dcfg.train, tokenizer, split=dcfg.split, **kw)
        if dcfg.eval is not None:
            held, eval_report = loader(dcfg.eval, tokenizer, split=dcfg.split, **kw)
        else:
            train, held = split_holdout(train, dcfg.eval_fraction, cfg.train.seed)
            eval_report = None
        if dcfg.max_samples is not None:
            train = train[: dcfg.max_samples]
        out[kind] = Split(train, held, report, eval_report)
    return out


def flatten(items: list) -> list[Sequence]:
    """Sequences of a dataset: demonstrations as they are; pairs as all chosen, then rejected."""
    if items and isinstance(items[0], Pair):
        return [p.chosen for p in items] + [p.rejected for p in items]
    return list(items)


def item_length(item: Sequence | Pair) -> int:
    if isinstance(item, Pair):
        return max(len(item.chosen.input_ids), len(item.rejected.input_ids))
    return len(item.input_ids)


def batch_stream(items: list, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of index batches, grouped by length, reshuffled every epoch."""
    lengths = [item_length(it) for it in items]
    epoch = 0
    while True:
        yield from length_batches(lengths, batch_size, seed=seed + epoch, shuffle=True)
        epoch += 1


def collate_items(items: list, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    seqs = [items[i] for i in idx]
    if seqs and isinstance(seqs[0], Pair):
        seqs = [p.chosen for p in seqs] + [p.rejected for p in seqs]
    return {k: v.to(device) for k, v in collate(seqs, pad_id).items()}


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
        self.sft_params = cfg.objectives.sft.params()
        self.pref_params = cfg.objectives.pref.params()
        self.beta = float(getattr(self.pref_params, "beta", 0.1))
        self.policy = PolicyLogps(self.model, cfg.train.logprob_chunk_size).to(self.device)
        self.refs: dict[str, torch.Tensor] = {}
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
        if initial:
            wanted += [(f"{k}_eval", s.eval) for k, s in self.data.items()]
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
    def seq_logps(self, batch: dict, ref: torch.Tensor | None, idx: list[int]) -> SeqLogps:
        logp, n = self.policy(**batch)
        ref_logp = ref[idx].to(logp.device) if ref is not None else None
        return SeqLogps(logp, n, ref_logp)

    def pair_logps(self, batch: dict, ref: torch.Tensor | None, idx: list[int], n_items: int):
        logp, n = self.policy(**batch)  # one forward over chosen and rejected together
        b = len(idx)
        ref_c = ref_r = None
        if ref is not None:
            ref_c = ref[idx].to(logp.device)
            ref_r = ref[[i + n_items for i in idx]].to(logp.device)
        return PairLogps(SeqLogps(logp[:b], n[:b], ref_c), SeqLogps(logp[b:], n[b:], ref_r))

    def loss(self, kind: str, idx: list[int]) -> tuple[torch.Tensor, int]:
        """The training objective of `kind` on the batch `idx`; returns (loss, tokens processed)."""
        split = self.data[kind]
        batch = collate_items(split.train, idx, self.pad_id, self.device)
        if kind == "sft":
            lp = self.seq_logps(batch, self.refs.get("sft_train"), idx)
            loss = self.sft_obj.loss(lp, self.sft_params)
        else:
            lp = self.pair_logps(batch, self.refs.get("pref_train"), idx, len(split.train))
            loss = self.pref_obj.loss(lp, self.pref_params)
        return loss, int(batch["attention_mask"].sum())

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
        self.policy.eval()
        out: dict[str, float] = {}
        bs = self.cfg.train.eval_batch_size
        try:
            if "sft" in self.data:
                seqs = self.data["sft"].eval
                logp, n = self._all_logps(seqs, bs)
                out |= metrics.sft_metrics(SeqLogps(logp, n, self.refs["sft_eval"]))
            if "pref" in self.data:
                pairs = self.data["pref"].eval
                logp, n = self._all_logps(flatten(pairs), bs)
                ref, m = self.refs["pref_eval"], len(pairs)
                pair = PairLogps(
                    SeqLogps(logp[:m], n[:m], ref[:m]), SeqLogps(logp[m:], n[m:], ref[m:])
                )
                out |= metrics.pref_metrics(pair, self.beta)
        finally:
            self.policy.train()
        if "f_sft" in out and "f_pref" in out:
            out["ideal_distance"] = metrics.ideal_distance(
                out["f_sft"], out["f_pref"], self.f_sft_star, self.f_pref_star
            )
        return out

    def _all_logps(self, seqs: list[Sequence], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.acc.autocast():  # the training precision, as for the reference log-probs
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
    ideal: tuple[float, float] | None = None,
) -> dict:
    """Run one training job described by `cfg`; returns the summary written to summary.json."""
    run = Run(cfg, console, progress)
    con = run.console
    t_start = time.time()
    run.setup()
    run.f_sft_star, run.f_pref_star = ideal if ideal is not None else resolve_ideal(cfg, con)

    tc, sc = cfg.train, cfg.schedule
    params = trainable_parameters(run.model)
    optimizer = adamw(params, lr=tc.lr, weight_decay=tc.weight_decay)
    lr_sched = get_scheduler(tc.lr_schedule, optimizer, tc.warmup_steps, tc.max_steps)
    run.policy, optimizer, lr_sched = run.acc.prepare(run.policy, optimizer, lr_sched)

    streams = {
        k: batch_stream(s.train, tc.batch_size, tc.seed + i)
        for i, (k, s) in enumerate(sorted(run.data.items()))
    }
    current: dict[str, list[int]] = {}
    schedule = build_schedule(
        sc.name,
        lam=sc.lam,
        total_steps=tc.max_steps,
        seed=tc.seed,
        k=sc.k,
        f_sft_star=run.f_sft_star,
        f_pref_star=run.f_pref_star,
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
                    }
                )
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.max_steps:
                last_eval = eval_record(step + 1)
            bar.update(task, advance=1, info=_live(plan, step_losses, last_eval, tok_s))
    log.close()

    wall = time.time() - t_start
    summary = {
        "name": cfg.name or sc.name,
        "schedule": sc.name,
        "lam": sc.lam,
        "seed": tc.seed,
        "sft_objective": cfg.objectives.sft.name,
        "pref_objective": cfg.objectives.pref.name,
        "f_sft_star": run.f_sft_star,
        "f_pref_star": run.f_pref_star,
        "final": {k: v for k, v in last_eval.items() if k != "type"},
        "wall_s": round(wall, 2),
        "train_s": round(time.time() - t_train, 2),
        "steps": {"sft": steps["sft"], "pref": steps["pref"]},
        "data": {k: _report_dict(s) for k, s in run.data.items()},
    }
    if tc.save_model and run.acc.is_main_process:
        merge = bool(cfg.model.lora and cfg.model.lora.merge_on_save)
        save_model(
            run.acc.unwrap_model(run.policy).model,
            run.tokenizer,
            run.out / "model",
            merge_lora=merge,
        )
    _atomic_write(run.out / "summary.json", json.dumps(summary, indent=2))
    return summary


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
    out = {"train": len(split.train), "eval": len(split.eval)}
    for name, rep in (("train_report", split.report), ("eval_report", split.eval_report)):
        if rep is not None:
            out[name] = {
                "records": rep.n_records,
                "kept": rep.n_kept,
                "skipped": rep.skipped,
                "truncated": rep.truncated,
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
            run.console.log(msg)
        run.console.log(f"{kind}: {len(split.train)} train / {len(split.eval)} eval")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ the ideal point
def resolve_ideal(cfg: Config, console: Console) -> tuple[float, float]:
    """`(f_sft*, f_pref*)` from the config, from a (cached) calibration, or 0."""
    sc = cfg.schedule
    if sc.ideal == "config":
        return float(sc.f_sft_star), float(sc.f_pref_star)
    if sc.ideal == "calibrate":
        return calibrate(cfg, console)
    return 0.0, 0.0


def calibrate(cfg: Config, console: Console | None = None, progress: bool = False):
    """Short single-objective runs (SFT only, preference only); the best held-out loss of each is
    the ideal point. Cached by everything that affects it."""
    console = console or Console()
    relevant = cfg.model_copy(update={"name": None, "output_dir": "", "schedule": None})
    key = hashlib.sha256(
        (dump_config(relevant) + f"|{cfg.schedule.calibration_steps}").encode()
    ).hexdigest()[:24]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
    path = cache_dir / "calibration" / f"{key}.json"
    if path.exists():
        star = json.loads(path.read_text())
        console.log(f"ideal point from calibration cache: {star}")
        return star["f_sft_star"], star["f_pref_star"]
    best = {}
    for kind in ("sft", "pref"):
        sub = cfg.model_copy(deep=True)
        sub.name = f"calibrate-{kind}"
        sub.schedule = sub.schedule.model_copy(update={"name": kind, "ideal": "zero"})
        steps = cfg.schedule.calibration_steps  # only the best value is needed: 3 evaluations
        sub.train = sub.train.model_copy(
            update={"max_steps": steps, "eval_every": max(steps // 2, 1), "save_model": False}
        )
        sub.output_dir = str(path.parent / f"{key}-{kind}")
        console.log(f"calibrating f_{kind}*: {kind} alone for {sub.train.max_steps} steps")
        train(sub, console=console, progress=progress, ideal=(0.0, 0.0))
        evals = [json.loads(line) for line in (Path(sub.output_dir) / "metrics.jsonl").open()]
        best[kind] = min(e[f"f_{kind}"] for e in evals if e["type"] == "eval")
    star = {"f_sft_star": best["sft"], "f_pref_star": best["pref"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(star))
    console.log(f"ideal point: {star}")
    return star["f_sft_star"], star["f_pref_star"]
