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
console = Console(log_path=False)  # log lines without their source file and line (--verbose)


@app.callback()
def _start(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="log lines name their source file and line"
    ),
) -> None:
    """SFT and preference optimization, jointly, in one run."""
    global console
    from unitune.core.allocator import tune

    if verbose:
        console = Console(log_path=True)
    else:
        _quiet_engines()

    tune()  # glibc's allocator kept from mmap/munmap churn (`allocator.py`)


def main() -> None:
    """The `unitune` command: on tcmalloc where it is installed (`core/allocator.py`), then the
    app."""
    from unitune.core.allocator import preload

    preload()
    app()


def _quiet_engines() -> None:
    """DeepSpeed warns, with its source file and line, that it fell back to the CPU whenever it
    is imported without a GPU: nothing a user can act on, so it is dropped (`--verbose` keeps it).
    A filter, not a level: DeepSpeed resets its logger's level when it is imported."""
    import logging

    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "Setting accelerator to CPU" not in record.getMessage()
    )


def _fail(msg: str) -> None:
    from rich.markup import escape  # "pip install 'unitune[deepspeed]'" is not markup

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _check_model(spec, label: str = "model.name") -> None:
    """Fail in one line, before any data is read or any directory is written, when the model
    cannot be loaded (`models.check_model_source`)."""
    from unitune.models.errors import ModelLoadError
    from unitune.models.source import check_model_source

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
    profile: bool = typer.Option(
        False, "--profile", help="where each step's time and memory go (train.profile)"
    ),
) -> None:
    """Train with the config's objectives and schedule."""
    from unitune.core.interrupts import Interrupted
    from unitune.data import DataError
    from unitune.jobs import train as run_train
    from unitune.merging.errors import MergeError
    from unitune.models.errors import ModelLoadError
    from unitune.rewards import RewardError, RewardSpecError
    from unitune.training.checkpoint import CheckpointError
    from unitune.training.engines import EngineError
    from unitune.training.hub import HubError
    from unitune.training.loop import JudgeFailedError, NonFiniteError
    from unitune.training.resume import ResumeError
    from unitune.training.rundir import RunDirLocked

    cfg = _load(config, (set_ or []) + (["train.profile=true"] if profile else []))
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
        JudgeFailedError,
        EngineError,
        HubError,
        RunDirLocked,
        MergeError,
        RewardError,
        RewardSpecError,
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
def sweep(
    sweep_file: Path = typer.Argument(..., help="sweep YAML: base config, grid and/or runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the runs and their state only"),
    print_commands: bool = typer.Option(
        False, "--print-commands", help="write each run's config, print one train command each"
    ),
    keep_going: bool = typer.Option(
        False, "--keep-going", help="a run that fails does not stop the others"
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """Run a grid of configs (schedules x lam x seeds ...): one run directory each; finished runs
    are skipped and interrupted ones resume, so a sweep can be stopped and rerun."""
    from rich.table import Table

    from unitune.core.interrupts import Interrupted
    from unitune.study.sweep import RUN_ERRORS, check_models, commands, load_sweep, run_sweep

    if not sweep_file.exists():
        _fail(f"{sweep_file}: no such file")
    try:
        plan = load_sweep(sweep_file)
        if print_commands:
            print("\n".join(commands(plan)))
            return
        if dry_run:
            table = Table(title=f"sweep {plan.out}: {len(plan.runs)} runs")
            for col in ("run", "sets", "state"):
                table.add_column(col, overflow="fold")
            for r in plan.runs:
                sets = ", ".join(f"{k}={v}" for k, v in r.overrides.items())
                table.add_row(r.name, sets, r.status())
            console.print(table)
            return
        check_models(plan)
        results = run_sweep(plan, console=console, progress=not no_progress, keep_going=keep_going)
    except (ConfigError, *RUN_ERRORS) as e:
        _fail(str(e))
    except Interrupted as e:
        console.print(
            f"[bold yellow]stopped:[/] {e}; rerun `unitune sweep {sweep_file}` to continue "
            "(finished runs are skipped, checkpointed ones resume)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + e.signum) from None
    counts = {s: sum(r["status"] == s for r in results) for s in ("trained", "resumed", "skipped")}
    failed = [r for r in results if r["status"] == "failed"]
    console.print(
        f"sweep {plan.out}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + (f", {len(failed)} failed" if failed else "")
        + f"; compare them with: unitune report {plan.out}"
    )
    for r in failed:
        console.print(f"[bold red]failed:[/] {r['name']}: {r['error']}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="a run directory: its model/ is uploaded"),
    repo_id: str = typer.Argument(..., help="Hugging Face Hub repo id: owner/name or name"),
    private: bool = typer.Option(True, "--private/--public", help="a new repo's visibility"),
) -> None:
    """Upload a run's saved model, with its model card, to the Hugging Face Hub (HF_TOKEN)."""
    from unitune.training.hub import HubError, push_run

    try:
        url = push_run(run_dir, repo_id, private=private)
    except HubError as e:
        _fail(str(e))
    console.print(f"pushed {run_dir / 'model'} to {url}", highlight=False, soft_wrap=True)


@app.command()
def calibrate(
    config: Path = typer.Argument(..., help="YAML config"),
    set_: list[str] = typer.Option(None, "--set", help="override: key.path=value (repeatable)"),
) -> None:
    """Estimate the ideal point (f_sft*, f_pref*) by short single-objective runs (cached)."""
    from unitune.data import DataError
    from unitune.models.errors import ModelLoadError
    from unitune.training.calibration import calibrate as run_calibrate

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
    from unitune.study.plots import plot_runs

    try:
        files = plot_runs(run_dirs, out, title=title)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print("wrote " + ", ".join(str(f) for f in files))


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="run directories or sweep directories"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="output directory"),
) -> None:
    """Tables, figures and an HTML page over runs; runs that differ only in the seed are one
    group (mean ± std)."""
    from rich.text import Text

    from unitune.study.report import ReportError, build_report, rich_tables

    try:
        result = build_report(dirs, out)
    except ReportError as e:
        _fail(str(e))
    for table in rich_tables(result.tables):
        console.print(table)
    for note in result.notes:
        console.print(Text.assemble(("note: ", "yellow"), note), soft_wrap=True)
    console.print(f"report: {result.index}", highlight=False, soft_wrap=True)


def _online_study(
    model: str, out: Path, steps: int | None, full: bool, schedules: str | None,
    methods: str | None, online: bool, reward_model_steps: int, precision: str,
    seeds: int | None, no_progress: bool,
) -> None:  # fmt: skip
    from unitune.models.config import ModelConfig
    from unitune.study.online_study import ARMS, STUDY_SCHEDULES, run_online_study

    if not online:
        _fail("--study is the online study: add --online")
    arms = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        _fail(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(ARMS)}")
    chosen = tuple(schedules.split(",")) if schedules else STUDY_SCHEDULES
    bad = [s for s in chosen if s not in STUDY_SCHEDULES]
    if bad:
        _fail(f"--schedules {','.join(bad)}: the study runs {','.join(STUDY_SCHEDULES)}")
    _check_model(ModelConfig(name=model), label="--model")
    run_online_study(
        model=model, out_dir=out if out != Path("runs/demo") else Path("runs/online-study"),
        arms=arms, schedules=chosen, steps=steps, seeds=seeds or 2,
        precision=None if precision == "auto" else precision, preset="full" if full else "quick",
        reward_model_steps=reward_model_steps, console=console, progress=not no_progress,
    )  # fmt: skip


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
    schedules: str | None = typer.Option(
        None,
        help="comma-separated; default sequential,mix,alright,maxright,parallel "
        "(--online: the four per-step ones)",
    ),
    sft: str = typer.Option("sft", help="SFT-family objective"),
    pref: str | None = typer.Option(
        None, help="preference-family objective; default dpo (--online: una_online)"
    ),
    online: bool = typer.Option(
        False,
        "--online",
        help="train a reward model on the demo pairs, then the preference slot online",
    ),
    reward_model_steps: int = typer.Option(
        20, "--reward-model-steps", min=1, help="--online: the reward model's steps"
    ),
    precision: str = typer.Option(
        "auto", help="auto (bf16 where the hardware has fast bf16, else no), no, bf16 or fp16"
    ),
    seeds: int | None = typer.Option(
        None,
        "--seeds",
        min=1,
        help="run every schedule over this many seeds: mean ± std (default 1; --study: 2)",
    ),
    study: bool = typer.Option(
        False,
        "--study",
        help="with --online: the online study, every method alone and "
        "jointly with SFT (ALRIGHT, mix), over seeds",
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="--study: comma-separated methods; default una_online/init,"
        "una_online/rollout,online_dpo,grpo,una_pair,dpo",
    ),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Compare the joint schedules and parallel (PAFT) on the embedded model and the demo data,
    then report them: table, win rate, retention, Pareto plot, HTML. `--online --study`: the
    online methods against the offline ones, alone and with SFT."""
    from unitune.models.config import ModelConfig
    from unitune.objectives import REGISTRY
    from unitune.study.demo import ONLINE_SCHEDULES, SCHEDULES, run_demo

    if precision not in ("auto", "no", "bf16", "fp16"):
        _fail(f"--precision {precision!r}: expected auto, no, bf16 or fp16")
    if study:
        _online_study(model, out, steps, full, schedules, methods, online, reward_model_steps,
                      precision, seeds, no_progress)  # fmt: skip
        return
    if methods is not None:
        _fail("--methods chooses the methods of --online --study")
    seeds = seeds or 1
    pref = pref or ("una_online" if online else "dpo")
    kind = REGISTRY[pref].data if pref in REGISTRY else None
    if kind is not None and (kind == "prompts") != online:
        _fail(f"--pref {pref}: trains {'online' if kind == 'prompts' else 'offline'}; "
              f"{'drop' if not online else 'add'} --online or name "
              f"{'an offline' if not online else 'an online'} objective")  # fmt: skip
    chosen = tuple(schedules.split(",")) if schedules else (
        ONLINE_SCHEDULES if online else SCHEDULES
    )  # fmt: skip
    if online and "parallel" in chosen:
        _fail("--schedules parallel: PAFT's parallel job trains offline only; "
              f"with --online use {','.join(ONLINE_SCHEDULES)}")  # fmt: skip
    _check_model(ModelConfig(name=model), label="--model")
    run_demo(
        precision=None if precision == "auto" else precision,
        model=model,
        out_dir=out,
        schedules=chosen,
        lam=lam,
        steps=steps,
        sft=sft,
        pref=pref,
        preset="full" if full else "quick",
        seeds=seeds,
        online=online,
        reward_model_steps=reward_model_steps,
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
        head = _wrap("", f"{o.name}  ({o.slot} slot; {data}; reference model: {ref})", width)
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
    from unitune.merging.errors import MergeError
    from unitune.merging.merge import merge as run_merge
    from unitune.models.errors import ModelLoadError

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


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="run directory, or model: local dir, hub id, builtin:"),
    prompts: Path = typer.Option(
        None, "--prompts", help="preference or SFT JSONL; default: the run's held-out pairs"
    ),
    judge: str = typer.Option(
        None, "--judge", help="demo | rm:PATH_OR_ID | openai:MODEL; default: the run's eval.judge"
    ),
    judge_url: str = typer.Option(None, "--judge-url", help="openai: the endpoint's base URL"),
    judge_key_env: str = typer.Option(
        None, "--judge-key-env", help="openai: the variable holding the API key (OPENAI_API_KEY)"
    ),
    judge_trust_remote_code: bool = typer.Option(
        False, "--judge-trust-remote-code", help="rm: allow the reward model's own code"
    ),
    max_samples: int = typer.Option(None, "--max-samples", min=1, help="the first N prompts"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="default 48"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    tasks: str = typer.Option(
        None, "--tasks", help="lm-eval tasks, comma-separated: unitune_mc,mmlu,..."
    ),
    limit: float = typer.Option(None, "--limit", help="documents per task (a fraction if < 1)"),
    out: Path = typer.Option(None, "--out", "-o", help="output directory; default TARGET/eval"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    dtype: str = typer.Option(
        "model", "--dtype", help="model | float32 | bfloat16 (packed for the CPU's kernels)"
    ),
) -> None:
    """Generate on held-out prompts, judge against the references (win rate), and measure
    benchmark retention (lm-eval); writes generations.jsonl and eval.json."""
    from unitune.data import DataError
    from unitune.eval.evaluate import evaluate_target
    from unitune.eval.generate import GenerationError
    from unitune.eval.retention import RetentionError
    from unitune.judges.base import JudgeError
    from unitune.models.errors import ModelLoadError

    errors = (ConfigError, DataError, ModelLoadError, JudgeError, GenerationError, RetentionError)
    task_list = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        report, out_dir = evaluate_target(
            target, prompts=prompts, judge=judge, judge_url=judge_url, judge_key_env=judge_key_env,
            judge_trust_remote_code=judge_trust_remote_code, max_samples=max_samples,
            max_new_tokens=max_new_tokens, batch_size=batch_size, tasks=task_list, limit=limit,
            out=out, progress=not no_progress, console=console, dtype=dtype,
        )  # fmt: skip
    except errors as e:
        _fail(str(e))
    _print_eval(report, out_dir)


def _print_eval(report: dict, out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"eval of {report['target']}")
    table.add_column("")
    table.add_column("", overflow="fold")
    if report["win_rate"] is not None:
        table.add_row(
            "win rate",
            f"{report['win_rate']:.3f} ± {report['win_rate_se']:.3f} (judge {report['judge']})",
        )
        table.add_row(
            "wins / ties / losses",
            f"{report['wins']} / {report['ties']} / {report['losses']} of {report['n']}",
        )
    for task, metrics in report["retention"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        table.add_row(task, shown or "-")
    console.print(table)
    console.print(f"wrote {out_dir / 'eval.json'}", highlight=False)


@app.command()
def chat(
    target: str = typer.Argument(..., help="run directory, or model: local dir, hub id, builtin:"),
    prompt: str = typer.Option(None, "--prompt", help="one message: print the reply and exit"),
    system: str = typer.Option(None, "--system", help="a system message"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    dtype: str = typer.Option(
        "model", "--dtype", help="model | float32 | bfloat16 (packed for the CPU's kernels)"
    ),
) -> None:
    """Talk to a model through its chat template: one reply (--prompt) or a conversation."""
    from unitune.eval.chat import chat_loop, reply
    from unitune.eval.evaluate import load_target
    from unitune.eval.generate import GenerationError
    from unitune.models.errors import ModelLoadError

    try:
        loaded = load_target(target, dtype=dtype)
        if prompt is not None:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            reply(loaded.model, loaded.tokenizer, messages, max_new_tokens=max_new_tokens)
            return
        chat_loop(loaded.model, loaded.tokenizer, system=system, max_new_tokens=max_new_tokens)
    except (ConfigError, ModelLoadError, GenerationError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
