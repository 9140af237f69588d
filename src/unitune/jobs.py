"""A training job as the command line runs it: the ideal point resolved, then the trainer's loop,
or, for `parallel`, its two branches and the merge (`parallel.py`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from unitune.config import Config
from unitune.eval.heldout import Ideal
from unitune.merge.paft import train_parallel
from unitune.train.calibration import resolve_ideal
from unitune.train.loop import train as train_loop


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
    if cfg.schedule.name == "parallel":  # two runs and a merge, not a per-step schedule
        return train_parallel(cfg, console=console, progress=progress, ideal=ideal, resume=resume)
    star = ideal if ideal is not None else resolve_ideal(cfg, console)
    return train_loop(cfg, star, console=console, progress=progress, resume=resume)
