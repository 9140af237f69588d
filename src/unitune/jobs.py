"""A training job as the command line runs it, by `cfg.job`: `train`, the ideal point resolved,
then the trainer's loop (with PAFT's L1 penalty when `schedule.l1` asks for it); `parallel`, its
two branches and the merge (`merging/paft.py`); `reward_model`, a Bradley-Terry reward model
(`training/reward_model.py`). The job is dispatched here and nowhere else in
training."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from unitune.config import Config
from unitune.eval.heldout import Ideal
from unitune.merging.methods import method_of
from unitune.merging.paft import l1_penalty, train_parallel
from unitune.training.calibration import resolve_ideal
from unitune.training.loop import train as train_loop
from unitune.training.reward_model import train_reward_model
from unitune.training.rundir import lock_output_dir


def train(
    cfg: Config,
    *,
    console: Console | None = None,
    progress: bool = True,
    ideal: Ideal | None = None,
    resume: bool | str | Path = False,
) -> dict:
    """Run the job `cfg` describes; returns the summary written to summary.json."""
    console = console or Console()
    if cfg.job == "parallel":
        method_of(cfg.parallel.merge.method)  # an unknown one fails now, not after training
    with lock_output_dir(cfg.output_dir):  # one run per directory; raises RunDirLocked
        if cfg.job == "parallel":  # two runs and a merge, not a per-step schedule
            return train_parallel(
                cfg, console=console, progress=progress, ideal=ideal, resume=resume
            )
        if cfg.job == "reward_model":  # a Bradley-Terry reward model on data.pref
            return train_reward_model(cfg, console=console, progress=progress, resume=resume)
        star = ideal if ideal is not None else resolve_ideal(cfg, console)
        return train_loop(
            cfg, star, console=console, progress=progress, resume=resume, penalty=l1_penalty(cfg)
        )
