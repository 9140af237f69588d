"""Find run directories, read them, and group the runs that differ only in their seed.

A run directory is one that holds ``summary.json`` (docs/ARCHITECTURE.md, "Run directory"); a
sweep directory holds run directories at any depth. A run directory is not searched further: a
parallel (PAFT) run's ``sft/`` and ``pref/`` are its branches, not runs of their own (as
`plots.load_run` reads them), and ``model/`` or ``checkpoints/`` hold no runs. A directory with
``config.yaml`` but no ``summary.json`` is a run still in progress: skipped, with a note.

Two runs are in one group when their resolved configs are equal once ``train.seed``,
``output_dir``, ``name`` and ``cache_dir`` are removed. A run without ``config.yaml`` is compared
by what its summary says (a parallel run written before its job wrote a ``config.yaml`` of its
own, by its SFT branch's config with the schedule set back to ``parallel``). A parallel run is
known by its summary's ``job`` (or, in run directories written before ``parallel`` was a job, its
``schedule``); its summary's ``schedule`` is ``parallel`` either way, which labels its group.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unitune.study.plots import is_parallel_run, read_eval_lines

__all__ = [
    "IGNORED_KEYS",
    "Group",
    "ReportError",
    "Run",
    "find_runs",
    "flatten",
    "group_runs",
    "read_run",
]

# config keys that do not make two runs different experiments (dotted paths)
IGNORED_KEYS = ("train.seed", "output_dir", "name", "cache_dir")
# the order schedules are listed in; others follow alphabetically
DASH = "\u2013"  # shown for a value that is not there
MAX_KEYS = 4  # differing config keys named in a group's label
SCHEDULE_ORDER = ("sft", "pref", "sequential", "mix", "alright", "maxright", "parallel")


class ReportError(ValueError):
    """Bad input to a report: the message names the directory or file, in one line."""


@dataclass
class Run:
    """One run directory, as read."""

    run_dir: Path
    summary: dict[str, Any]
    config: dict[str, Any] | None  # config.yaml (or what stands for it, see `config_source`)
    config_text: str  # config.yaml as written ("" when there is none)
    config_source: str  # "config.yaml", "sft/config.yaml" or "summary.json"
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl eval lines
    gen_eval: dict[str, Any] | None = None  # eval.json (generation evaluation)

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.run_dir.name)

    @property
    def schedule(self) -> str:
        return str(self.summary.get("schedule") or _get(self.config, "schedule.name") or "?")

    @property
    def lam(self) -> float | None:
        lam = self.summary.get("lam", _get(self.config, "schedule.lam"))
        return float(lam) if isinstance(lam, (int, float)) else None

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", _get(self.config, "train.seed"))
        return seed if isinstance(seed, int) else None

    @property
    def ideal(self) -> tuple[float, float]:
        """(f_sft*, f_pref*) from the summary; a missing one is 0, as `plots.load_run` reads it."""
        a, b = self.summary.get("f_sft_star"), self.summary.get("f_pref_star")
        return (float(a) if a is not None else 0.0, float(b) if b is not None else 0.0)


@dataclass
class Group:
    """Runs whose configs differ only in the seed."""

    id: str  # g1, g2, ... in the report's order
    label: str  # schedule, λ and what tells this group from the others of its schedule
    series: str  # the λ trade-off line it is on: the label without λ
    key: str  # the canonical config the runs share (JSON)
    config: dict[str, Any] | None  # that shared config (seed, output_dir, name, cache_dir removed)
    runs: list[Run]
    differs: dict[str, Any] = field(default_factory=dict)  # keys that set it apart (dotted)

    @property
    def schedule(self) -> str:
        return self.runs[0].schedule

    @property
    def lam(self) -> float | None:
        return self.runs[0].lam

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def _get(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def find_runs(dirs: list[Path]) -> tuple[list[Path], list[str]]:
    """Every run directory under ``dirs`` (each once, in sorted order per input), and notes on
    runs skipped (in progress). Raises ReportError for a missing input or when none is found."""
    found: list[Path] = []
    notes: list[str] = []
    seen: set[Path] = set()

    def walk(d: Path) -> None:
        if (d / "summary.json").is_file():
            if _job(d / "summary.json") == "reward_model":  # no f_sft / f_pref to compare
                notes.append(f"{d}: a reward model (job reward_model), not a training run: skipped")
                return
            if d.resolve() not in seen:
                seen.add(d.resolve())
                found.append(d)
            return
        if (d / "config.yaml").is_file():
            notes.append(f"{d}: config.yaml but no summary.json (a run in progress?): skipped")
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir())
        except OSError as err:
            raise ReportError(f"{d}: cannot list the directory: {err.strerror}") from None
        for child in children:
            walk(child)

    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        walk(d)
    if not found:
        where = ", ".join(str(d) for d in dirs)
        raise ReportError(f"no summary.json found under {where}")
    return found, notes


def _job(summary: Path) -> str | None:
    """The `job` a summary.json records (None when it cannot be read: `read_run` reports it)."""
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("job")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ReportError(f"{path}: cannot read: {why}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: bad JSON: {err}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: bad YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a YAML mapping")
    return data, text


def _config(run_dir: Path, summary: dict[str, Any]) -> tuple[dict | None, str, str]:
    if (run_dir / "config.yaml").is_file():
        cfg, text = _read_yaml(run_dir / "config.yaml")
        return cfg, text, "config.yaml"
    branch = run_dir / "sft" / "config.yaml"
    if is_parallel_run(summary) and branch.is_file():
        # a parallel run written before paft.train_parallel wrote a config.yaml of its own: its
        # SFT branch's is the run's config with the schedule's name set to sft and
        # train.save_model forced on (and, in those runs, the schedule's name was "parallel")
        cfg, text = _read_yaml(branch)
        cfg.setdefault("schedule", {})["name"] = "parallel"
        if summary.get("lam") is not None:
            cfg["schedule"]["lam"] = summary["lam"]
        cfg.get("train", {}).pop("save_model", None)
        return cfg, text, "sft/config.yaml"
    stand_in = {
        "schedule": {"name": summary.get("schedule"), "lam": summary.get("lam")},
        "objectives": {
            "sft": {"name": summary.get("sft_objective")},
            "pref": {"name": summary.get("pref_objective")},
        },
    }
    return stand_in, "", "summary.json"


def read_run(run_dir: Path) -> Run:
    """Read one run directory: summary.json (required), config.yaml, the eval lines of
    metrics.jsonl and eval.json (both optional). Errors name the file."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    try:
        evals = read_eval_lines(run_dir, required=False)  # as `unitune plot` reads them
    except (OSError, ValueError) as err:
        raise ReportError(" ".join(str(err).split())) from None
    final = summary.get("final")
    if (
        isinstance(final, dict)
        and final.get("f_sft") is not None
        and final.get("f_pref") is not None
        and (not evals or _num(final.get("step"), -1) > _num(evals[-1].get("step"), -1))
    ):
        evals.append(final)  # a final eval that was not logged as a line (as plots.load_run)
    cfg, text, source = _config(run_dir, summary)
    gen = _read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else None
    return Run(run_dir, summary, cfg, text, source, evals, gen)


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) else default


def comparable(config: dict[str, Any] | None) -> dict[str, Any]:
    """The config without the keys that do not tell experiments apart (`IGNORED_KEYS`)."""
    out = json.loads(json.dumps(config or {}))  # a deep copy of plain data
    for dotted in IGNORED_KEYS:
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:g}"
    elif isinstance(v, str):
        text = v
    else:
        text = json.dumps(v)
    return text if len(text) <= 32 else text[:31] + "\u2026"


def _schedule_rank(name: str) -> tuple[int, str]:
    if name in SCHEDULE_ORDER:
        return SCHEDULE_ORDER.index(name), ""
    return len(SCHEDULE_ORDER), name


def group_runs(runs: list[Run]) -> list[Group]:
    """Group the runs by their comparable config; label each group by its schedule, its λ and
    the config keys that differ between the groups of that schedule. Groups are ordered by
    schedule, series, then λ; the runs of a group by seed."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps(comparable(run.config), sort_keys=True, default=str)
        by_key.setdefault(key, []).append(run)
    flat = {key: flatten(json.loads(key)) for key in by_key}
    schedule_of = {key: members[0].schedule for key, members in by_key.items()}
    drawn: list[tuple[tuple, str, str, str, dict[str, Any]]] = []
    for key, members in by_key.items():
        peers = [k for k in by_key if schedule_of[k] == schedule_of[key]]
        names = sorted({n for k in peers for n in flat[k]})
        differing = [
            n
            for n in names
            if n not in ("schedule.name", "schedule.lam")
            and len({json.dumps(flat[k].get(n, DASH), default=str) for k in peers}) > 1
        ]
        shown = [f"{n}={_value(flat[key].get(n, DASH))}" for n in differing[:MAX_KEYS]]
        if len(differing) > MAX_KEYS:
            shown.append(f"(+{len(differing) - MAX_KEYS} more keys)")
        extra = " ".join(shown)
        series = " ".join(x for x in (schedule_of[key], extra) if x)
        lam = members[0].lam
        label = f"{schedule_of[key]} \u03bb={lam:g}" if lam is not None else schedule_of[key]
        label = " ".join(x for x in (label, extra) if x)
        order = (_schedule_rank(schedule_of[key]), series, lam if lam is not None else math.inf)
        differs = {n: flat[key].get(n) for n in differing}
        drawn.append((order, key, label, series, differs))
    drawn.sort(key=lambda t: (t[0], t[2]))
    groups: list[Group] = []
    labels: dict[str, int] = {}
    for i, (_, key, label, series, differs) in enumerate(drawn, 1):
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:  # configs that differ where the label cannot show it
            label = f"{label} #{labels[label]}"
        members = sorted(by_key[key], key=lambda r: (r.seed is None, r.seed or 0, str(r.run_dir)))
        groups.append(Group(f"g{i}", label, series, key, json.loads(key), members, differs))
    return groups
