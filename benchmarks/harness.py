"""What the benchmarks share: every measured thing runs in its own child process of one parent
(fresh allocator, its own peak RSS) and reports one `RESULT {json}` line on stdout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from unitune.core.usage import cpu_name

__all__ = ["cpu_name", "gpu_name", "report", "run_child", "run_measured", "update_readme"]


def gpu_name() -> str:
    """The first CUDA device's name (the machine a `--device cuda` figure was measured on)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"


def machine_slug() -> str:
    """This CPU's kind for a README marker: `amd-epyc-avx512-bf16`, `intel-xeon-processor-amx`."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)", "", cpu_name().lower())).strip("-")


def report(result: dict) -> None:
    """A child's answer to its parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(cmd: list[str], env: dict[str, str] | None = None, what: str = "") -> dict:
    """Run `cmd` and return the dict of its last `RESULT` line; exit naming it if it failed."""
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{what or ' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def run_measured(cmd: list[str], env: dict[str, str], what: str) -> tuple[str, float]:
    """Run `cmd`; return its output (stdout and stderr) and its peak RSS in MiB (`wait4`); exit
    naming it if it failed."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if code != 0:
        sys.exit(f"{what} failed ({code}):\n{text[-4000:]}")
    return text, usage.ru_maxrss / 1024


def update_readme(name: str, text: str) -> Path:
    """Put `text` between the `<!-- bench:NAME@MACHINE -->` markers of README.md, where MACHINE
    is this CPU's kind (`machine_slug()`: each kind keeps its own table; where other kinds have
    theirs and this one has none, its block is added after theirs), else between the
    `<!-- bench:NAME -->` markers."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    body = readme.read_text()
    mine = f"{name}@{machine_slug()}"
    if f"<!-- bench:{mine} -->" not in body and f"<!-- /bench:{name}@" in body:
        # other machine kinds keep their own tables: this one's goes after the last of them
        at = body.index("-->", body.rindex(f"<!-- /bench:{name}@")) + 3
        block = f"\n\n<!-- bench:{mine} -->\n<!-- /bench:{mine} -->"
        body = body[:at] + block + body[at:]
    if f"<!-- bench:{mine} -->" in body:
        name = mine
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start not in body or end not in body:
        sys.exit(f"README.md has no {start} markers")
    a, b = body.index(start) + len(start), body.index(end)
    readme.write_text(body[:a] + "\n" + text.rstrip("\n") + "\n" + body[b:])
    print(f"updated {readme}")
    return readme
