"""What the benchmarks share: every measured thing runs in its own child process of one parent
(fresh allocator, its own peak RSS) and reports one `RESULT {json}` line on stdout."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

# glibc settings the Makefile uses for demo and tests (fewer page faults on CPU)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def peak_rss_mb() -> float:
    """This process's peak RSS so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def print_ratio_table(results: dict[str, dict], base: str, step_digits: int = 2) -> None:
    """Each row's median step time and peak RSS, and each as a multiple of row `base`'s."""
    width, col, ref = max(9, max(map(len, results)) + 2), f"x {base}", results[base]
    print(f"{'':{width}s} {'step s':>8s} {col:>10s} {'peak RSS MB':>12s} {col:>10s}")
    for name, r in results.items():
        print(
            f"{name:{width}s} {r['step_s']:8.{step_digits}f} {r['step_s'] / ref['step_s']:10.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / ref['peak_rss_mb']:10.2f}"
        )
