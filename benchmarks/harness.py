"""What the benchmarks share: every measured thing runs in its own child process of one parent
(fresh allocator, its own peak RSS) and reports one `RESULT {json}` line on stdout."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
