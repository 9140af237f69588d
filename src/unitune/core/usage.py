"""What a run costs in memory: the peak resident set of this process and the peak accelerator
memory, measured from a reset at the run's start (so that runs in one process, a sweep or the
demo, each get their own figure)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def cpu_name() -> str:
    """The CPU's model name, as `lscpu` shows it, with the widest matrix or vector unit it has
    (`amx`, `avx512_bf16`, `avx512`, `avx2`): the same model name covers machines that differ
    twofold in speed, so a figure names both."""
    import platform

    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    unit = next((u for u in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if u in flags), "")
    shown = {"amx_bf16": "amx", "avx512f": "avx512"}.get(unit, unit)
    return f"{name} ({shown})" if shown else name


def reset_peaks(device: torch.device | None = None) -> None:
    """Start measuring peaks from now: Linux resets the process's high-water mark (VmHWM) when
    "5" is written to /proc/self/clear_refs; CUDA its allocator's peak statistics. Elsewhere the
    RSS peak is the process's since it started (`getrusage`)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (`VmHWM`, `VmRSS`) in KiB; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux), else 0."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_mb() -> float:
    """Peak resident set size since `reset_peaks` (Linux) or since the process started, MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return round(hwm / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def peak_accelerator_mb(device: torch.device | None) -> float | None:
    """Peak memory the CUDA allocator held since `reset_peaks`, MiB; None on CPU."""
    if device is None or device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def costs(tokens: int, train_s: float, device: torch.device | None) -> dict[str, float | None]:
    """The cost figures of summary.json: tokens trained on, tokens per training second, peaks."""
    return {
        "tokens": tokens,
        "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_accelerator_mb": peak_accelerator_mb(device),
    }
