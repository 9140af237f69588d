"""The ideal point: from the config, from a (cached) calibration, or 0.

Calibration runs each objective alone for `schedule.calibration_steps` steps (the trainer's loop,
as any run) and keeps the best held-out value of each metric and of each objective's own loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from rich.console import Console

from unitune.config import Config, dump_config
from unitune.core.io import atomic_write, cache_dir
from unitune.data import data_fingerprint
from unitune.eval.heldout import Ideal
from unitune.models.fingerprint import model_fingerprint
from unitune.models.load import load_model
from unitune.rewards import rewards_fingerprint
from unitune.training.batches import flatten, load_data
from unitune.training.loop import train

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
    if cfg.is_online:  # an online slot's f_pref is its rewards' verdict: their files too
        parts += [rewards_fingerprint([r.reward for r in cfg.online.rewards])]
    console.log("calibration key: fingerprints of the model, the data and the rewards")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def for_calibration(cfg: Config) -> Config:
    """`cfg` without what does not change the ideal point and has no place in a calibration's
    short runs: trackers, hub uploads, generation and retention evaluations, the job and the
    parallel job's section (each objective is calibrated alone, whatever the job), so the cache
    key does not depend on them either."""
    train = cfg.train.model_copy(update={"report_to": [], "push_to_hub": None, "hub_private": True})
    ev = type(cfg.eval)(beta=cfg.eval.beta)  # of the eval section, only beta measures f_pref
    job = {"job": "train", "parallel": type(cfg.parallel)()}
    return cfg.model_copy(update={"train": train, "eval": ev, **job})


def calibrate(cfg: Config, console: Console | None = None, progress: bool = False) -> Ideal:
    """Short single-objective runs (SFT only, preference only). The best held-out value of each
    metric is `f*`, the best held-out value of each objective's own loss is `loss*` (MAXRIGHT's
    gaps compare like with like). Cached by the settings and the model's and data's fingerprints.
    """
    console = console or Console()
    cfg = for_calibration(cfg)
    relevant = cfg.model_copy(update={"name": None, "output_dir": "", "schedule": None})
    key = hashlib.sha256(
        (
            f"v{CALIBRATION_VERSION}|{dump_config(relevant)}|{cfg.schedule.calibration_steps}|"
            f"{input_fingerprint(cfg, console)}"
        ).encode()
    ).hexdigest()[:24]
    path = cache_dir(cfg.cache_dir) / "calibration" / f"{key}.json"
    if path.exists():
        star = Ideal(**json.loads(path.read_text()))
        console.log(f"ideal point from calibration cache: {star}")
        return star
    best: dict[str, float] = {}
    for kind in ("sft", "pref"):
        sub = cfg.model_copy(deep=True)
        sub.name = f"calibrate-{kind}"
        # each objective alone, as it is: no PAFT penalty on the SFT one
        sub.schedule = cfg.schedule.for_schedule(kind, ideal="zero", l1=0.0)
        steps = cfg.schedule.calibration_steps  # only the best value is needed: 3 evaluations
        sub.train = sub.train.model_copy(
            update={"max_steps": steps, "eval_every": max(steps // 2, 1), "save_model": False}
        )
        sub.output_dir = str(path.parent / f"{key}-{kind}")
        console.log(f"calibrating f_{kind}*: {kind} alone for {sub.train.max_steps} steps")
        train(sub, Ideal(), console=console, progress=progress)
        evals = [json.loads(line) for line in (Path(sub.output_dir) / "metrics.jsonl").open()]
        evals = [e for e in evals if e["type"] == "eval"]
        best[f"f_{kind}"] = min(e[f"f_{kind}"] for e in evals)
        best[f"loss_{kind}"] = min(e[cfg.own_loss_key(kind)] for e in evals)
    star = Ideal(**best)
    procs = PartialState()  # several processes: each took part in the runs, the main one writes
    if procs.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(asdict(star)))
    procs.wait_for_everyone()
    console.log(f"ideal point: {star}")
    return star
