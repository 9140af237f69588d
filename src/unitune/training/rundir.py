"""A run directory: its lock, the resolved config, the metrics log, the summary and the data report.

One run at a time holds a directory: `lock_output_dir` takes an exclusive `flock` on
`<output_dir>/.lock` before anything else is written there, and a second run is refused naming the
holder. The kernel drops the lock when its process ends, however it ends, so a killed run never
leaves a lock that blocks its resume.

Every file is written so that a crash never leaves it half-written: `summary.json` through a
temporary file and a rename; `metrics.jsonl` line by line, flushed, and cut back to a checkpoint's
line count on resume, so that the log holds the whole history with no step twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from unitune.config import Config
from unitune.core.io import atomic_write
from unitune.data import format_unused
from unitune.eval import heldout as metrics
from unitune.eval.heldout import Ideal
from unitune.training.batches import Split


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
    `final`. A parallel job's `schedule` is "parallel" too: reports, plots and the demo's tables
    group and label its runs by it, beside the per-step schedules."""
    sc = cfg.schedule
    schedule = "parallel" if cfg.job == "parallel" else sc.name
    return {
        "name": cfg.name or schedule,
        "job": cfg.job,
        "schedule": schedule,
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


def report_dict(split: Split) -> dict:
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


def report_data(data: dict[str, Split], console: Console, max_length: int) -> None:
    """Log what was loaded, skipped, truncated or left unused, per dataset."""
    for kind, split in data.items():
        for rep in (split.report, split.eval_report):
            if rep is None:
                continue
            msg = f"{kind}: {rep.source}: {rep.n_kept}/{rep.n_records} records"
            if rep.skipped:
                msg += f", skipped {sum(rep.skipped.values())} ({dict(rep.skipped)})"
            if rep.truncated:
                msg += f", truncated {rep.truncated} to max_length={max_length}"
            if rep.unused_columns:
                msg += f", unused columns: {format_unused(rep.unused_columns)}"
            if rep.cached:  # the counts are those of the build that filled the cache
                msg += " (from the tokenized-data cache)"
            console.log(msg)
        console.log(f"{kind}: {len(split.train)} train / {len(split.eval)} eval")


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written; `lines` counts them.

    Opened with `keep=n` (a resumed run: the line count its checkpoint recorded), lines beyond the
    first `n` (written after that checkpoint) are cut, so the log is the whole history with no
    step twice. `keep=0` starts a new log. `sink` (the experiment trackers, `trackers.sink`) gets
    every record written, the one place metrics reach them.
    """

    def __init__(
        self,
        path: Path,
        keep: int = 0,
        enabled: bool = True,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.path, self.lines, self.file, self.sink = path, keep, None, sink
        if not enabled:  # another process writes the log; this one only counts
            return
        if keep:
            old = path.read_text().splitlines(keepends=True) if path.exists() else []
            if len(old) < keep:
                raise ValueError(f"{path}: {len(old)} lines, but the checkpoint recorded {keep}")
            atomic_write(path, "".join(old[:keep]))
        self.file = path.open("a" if keep else "w")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.sink is not None:
                self.sink(record)
        self.lines += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The held lock of a run directory (`lock_output_dir`); `release()` or leave its `with`.

    A directory that the lock created and that holds nothing but the lock file when it is
    released (the run stopped on an error before writing anything) is removed with the lock
    file, so that a refused start leaves nothing behind."""

    def __init__(self, path: Path, fd: int, created: tuple[Path, ...] = ()):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.created and os.listdir(self.path.parent) == [LOCK_FILE]:
            self.path.unlink()  # still held: a run that opens it next sees it gone and retries
            for d in self.created:  # innermost first; each only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output_dir(output_dir: str | Path) -> RunLock:
    """Take the exclusive lock of `output_dir` (created if missing), or raise `RunDirLocked`
    naming the process that holds it. The lock file records this process's pid, host and start
    time; the lock itself is the `flock`, which dies with its process.

    In a distributed launch only the main process (`RANK` 0) locks; the others get a lock that
    holds nothing (they write nothing to the directory that the main process does not own)."""
    out = Path(output_dir)
    path = out / LOCK_FILE
    if os.environ.get("RANK", "0") != "0":
        return RunLock(path, -1)
    while True:
        created = tuple(d for d in (out, *out.parents) if not d.exists())
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirLocked(f"{out}: cannot create the run directory's lock: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise RunDirLocked(
                f"{out}: in use by another run ({_describe(holder)}); wait for it to finish, stop "
                "it, or choose another output_dir"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file while this one waited: take the new one
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunLock(path, fd, created)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
