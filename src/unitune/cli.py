"""The `unitune` command line."""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import typer
from rich.console import Console

from unitune.config import ConfigError, load_config

app = typer.Typer(
    help="SFT and preference optimization, jointly, in one run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _start() -> None:
    """SFT and preference optimization, jointly, in one run."""
    from unitune.allocator import tune

    tune()  # glibc's allocator kept from mmap/munmap churn (`allocator.py`)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _check_model(spec, label: str = "model.name") -> None:
    """Fail in one line, before any data is read or any directory is written, when the model
    cannot be loaded (`models.check_model_source`)."""
    from unitune.models import ModelLoadError, check_model_source

    try:
        check_model_source(spec, label=label)
    except ModelLoadError as e:
        _fail(str(e))


def _load(config: Path, overrides: list[str] | None):
    if not config.exists():
        _fail(f"{config}: no such file")
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _fail(str(e))


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config"),
    set_: list[str] = typer.Option(None, "--set", help="override: key.path=value (repeatable)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    resume: bool = typer.Option(
        False, "--resume", help="continue from the newest valid checkpoint of output_dir"
    ),
    resume_from: Path = typer.Option(
        None, "--resume-from", help="continue from this checkpoint directory"
    ),
) -> None:
    """Train with the config's objectives and schedule."""
    from unitune.checkpoint import CheckpointError
    from unitune.data import DataError
    from unitune.engines import EngineError
    from unitune.interrupts import Interrupted
    from unitune.jobs import train as run_train
    from unitune.models import ModelLoadError
    from unitune.trainer import NonFiniteError, ResumeError

    cfg = _load(config, set_)
    _check_model(cfg.model)
    again = str(resume_from) if resume_from is not None else resume
    try:
        summary = run_train(cfg, console=console, progress=not no_progress, resume=again)
    except (
        DataError,
        ModelLoadError,
        ResumeError,
        CheckpointError,
        NonFiniteError,
        EngineError,
    ) as e:
        _fail(str(e))
    except Interrupted as e:
        where = f"checkpoint {e.checkpoint.path}" if e.checkpoint else "no checkpoint written"
        how = (
            f"resume with: unitune train {config} --resume"
            if e.checkpoint
            else "set train.save_every to checkpoint"
        )
        console.print(
            f"[bold yellow]stopped:[/] {e}; {where}; {how}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + e.signum) from None
    f = summary["final"]
    console.print(
        f"done: {cfg.output_dir}  "
        + "  ".join(f"{k}={v:.4f}" for k, v in f.items() if isinstance(v, float))
    )


@app.command()
def calibrate(
    config: Path = typer.Argument(..., help="YAML config"),
    set_: list[str] = typer.Option(None, "--set", help="override: key.path=value (repeatable)"),
) -> None:
    """Estimate the ideal point (f_sft*, f_pref*) by short single-objective runs (cached)."""
    from unitune.calibration import calibrate as run_calibrate
    from unitune.data import DataError
    from unitune.models import ModelLoadError

    cfg = _load(config, set_)
    _check_model(cfg.model)
    try:
        star = run_calibrate(cfg, console, progress=True)
    except (DataError, ModelLoadError) as e:
        _fail(str(e))
    console.print(
        f"f_sft* = {star.f_sft:.4f}   f_pref* = {star.f_pref:.4f}   "
        f"(objectives' own losses: {cfg.own_loss_key('sft')}* = {star.loss_sft:.4f}   "
        f"{cfg.own_loss_key('pref')}* = {star.loss_pref:.4f})"
    )


@app.command()
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="run directories"),
    out: Path = typer.Option(Path("trajectories"), "--out", "-o", help="output path stem"),
    title: str = typer.Option(None, "--title"),
) -> None:
    """Trajectories of runs in the (f_sft, f_pref) plane, as PNG and SVG."""
    from unitune.plots import plot_runs

    try:
        files = plot_runs(run_dirs, out, title=title)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print("wrote " + ", ".join(str(f) for f in files))


@app.command()
def demo(
    model: str = typer.Option("builtin:smollm2-135m", help="model to post-train"),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="output directory"),
    steps: int | None = typer.Option(
        None, help="optimizer steps per schedule (equal budgets); default: the preset's"
    ),
    full: bool = typer.Option(
        False, "--full", help="the longer, stronger comparison: 40 steps, all held-out data"
    ),
    lam: float = typer.Option(0.5, help="weight / probability of the preference objective"),
    schedules: str = typer.Option(
        "sequential,mix,alright,maxright,parallel", help="comma-separated"
    ),
    sft: str = typer.Option("sft", help="SFT-family objective"),
    pref: str = typer.Option("dpo", help="preference-family objective"),
    precision: str = typer.Option(
        "auto", help="auto (bf16 where the hardware has fast bf16, else no), no, bf16 or fp16"
    ),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Compare the joint schedules and parallel (PAFT) on the embedded model and the demo data."""
    from unitune.config import ModelConfig
    from unitune.demo import run_demo

    if precision not in ("auto", "no", "bf16", "fp16"):
        _fail(f"--precision {precision!r}: expected auto, no, bf16 or fp16")
    _check_model(ModelConfig(name=model), label="--model")
    run_demo(
        precision=None if precision == "auto" else precision,
        model=model,
        out_dir=out,
        schedules=tuple(schedules.split(",")),
        lam=lam,
        steps=steps,
        sft=sft,
        pref=pref,
        preset="full" if full else "quick",
        console=console,
        progress=not no_progress,
    )


@app.command()
def objectives() -> None:
    """List the registered objectives, one block each: slot, data, whether a reference model is
    needed, default hyper-parameters, loss and source; wrapped to the terminal width."""
    from rich.text import Text

    from unitune.objectives import REGISTRY

    width = max(40, min(console.width, 100))
    say = functools.partial(console.print, soft_wrap=True, highlight=False)
    for line in _wrap(
        "", "objectives: set objectives.sft.name / objectives.pref.name in the config", width
    ):
        say(Text(line, style="bold"))
    for o in REGISTRY.values():
        data = f"{o.data} feedback" if o.data == "unpaired" else o.data
        if o.needs_labels:
            data += " with labels"
        ref = "yes" if o.needs_ref else "no"
        head = _wrap("", f"{o.name}  ({o.kind} slot; {data}; reference model: {ref})", width)
        say()
        title = Text(head[0])
        title.stylize("bold cyan", 0, len(o.name))
        say(title)
        for line in head[1:]:
            say(line)
        defaults = ", ".join(f"{k}={v}" for k, v in o.defaults.items()) or "-"
        for label, text in (("defaults", defaults), ("loss", o.summary), ("source", o.source)):
            for line in _wrap(label, text, width):
                say(line)


def _wrap(label: str, text: str, width: int) -> list[str]:
    """`text` wrapped to `width`, after `label` in a 12-column gutter (no gutter without one)."""
    first = f"  {label:<9} " if label else ""
    return textwrap.wrap(
        text,
        width,
        initial_indent=first,
        subsequent_indent=" " * len(first) if label else "    ",
        break_on_hyphens=False,
    ) or [first.rstrip()]


@app.command()
def merge(
    config: Path = typer.Argument(..., help="YAML merge config (base, models, method, output)"),
    set_: list[str] = typer.Option(None, "--set", help="override: key.path=value (repeatable)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Merge fine-tuned models or LoRA adapters into a base: task arithmetic, TIES or DARE."""
    from rich.table import Table

    from unitune.config import load_merge_config
    from unitune.merge import MergeError
    from unitune.merge import merge as run_merge
    from unitune.models import ModelLoadError

    if not config.exists():
        _fail(f"{config}: no such file")
    try:
        cfg = load_merge_config(config, set_ or [])
        report = run_merge(cfg, console=console, progress=not no_progress)
    except (ConfigError, MergeError, ModelLoadError) as e:
        _fail(str(e))
    table = Table(title=f"merged into {report['output']}")
    table.add_column("")
    table.add_column("", overflow="fold")
    table.add_row("method", report["method"])
    table.add_row("tensors", f"{report['tensors']} ({report['parameters']:,} parameters)")
    table.add_row("seconds", f"{report['seconds']:.1f}")
    size = f"{report['output_bytes'] / 1e6:.1f} MB in {report['shards']} file(s)"
    table.add_row("output size", size)
    for i, m in enumerate(report["models"]):
        table.add_row(
            f"models[{i}]",
            f"{m['path']} ({m['kind']}, weight {m['weight']:g}): delta sparsity "
            f"{m['sparsity']:.2%}, top-10% entries hold {m['top10_mass']:.1%} of its L1 mass",
        )
    console.print(table)


if __name__ == "__main__":
    app()
