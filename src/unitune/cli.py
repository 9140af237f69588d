"""The `unitune` command line."""

from __future__ import annotations

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


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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
) -> None:
    """Train with the config's objectives and schedule."""
    from unitune.data import DataError
    from unitune.trainer import train as run_train

    cfg = _load(config, set_)
    try:
        summary = run_train(cfg, console=console, progress=not no_progress)
    except DataError as e:
        _fail(str(e))
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
    from unitune.trainer import calibrate as run_calibrate

    cfg = _load(config, set_)
    f_sft, f_pref = run_calibrate(cfg, console, progress=True)
    console.print(f"f_sft* = {f_sft:.4f}   f_pref* = {f_pref:.4f}")


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
    steps: int = typer.Option(40, help="optimizer steps per schedule (equal budgets)"),
    lam: float = typer.Option(0.5, help="weight / probability of the preference objective"),
    schedules: str = typer.Option(
        "sequential,mix,alright,maxright,parallel", help="comma-separated"
    ),
    sft: str = typer.Option("sft", help="SFT-family objective"),
    pref: str = typer.Option("dpo", help="preference-family objective"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Compare the joint schedules and parallel (PAFT) on the embedded model and the demo data."""
    from unitune.demo import run_demo

    run_demo(
        model=model,
        out_dir=out,
        schedules=tuple(schedules.split(",")),
        lam=lam,
        steps=steps,
        sft=sft,
        pref=pref,
        console=console,
        progress=not no_progress,
    )


@app.command()
def objectives() -> None:
    """List the registered objectives with their data kind, defaults and source."""
    from rich.table import Table

    from unitune.objectives import REGISTRY

    table = Table(title="objectives (objectives.sft / objectives.pref in the config)")
    for col in ("name", "slot", "data", "loss", "defaults", "reference", "source"):
        table.add_column(col, overflow="fold")
    for o in REGISTRY.values():
        defaults = ", ".join(f"{k}={v}" for k, v in o.defaults.items()) or "-"
        table.add_row(o.name, o.kind, o.data, o.summary, defaults,
                      "yes" if o.needs_ref else "no", o.source)  # fmt: skip
    console.print(table)


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
