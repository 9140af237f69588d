"""The memory allocator training runs on: tcmalloc where the machine has it, else glibc's,
tuned from inside the process.

Training allocates and frees the same large activation and gradient buffers every step. glibc
serves each allocation above 128 KiB-32 MiB (its adaptive mmap threshold) with a fresh `mmap` and
returns it with `munmap`, so every step pays page faults and zeroing of memory it just gave back,
and trims the heap top as soon as it is free. `M_MMAP_MAX = 0` keeps large blocks in the heap and
a high `M_TRIM_THRESHOLD` keeps freed memory for the next step. These are the settings of the
environment variables `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`, which glibc reads
only at start-up; `mallopt` sets the same at any time, so `unitune` applies them itself (`tune`).
Kept in one heap, the blocks of one step leave holes the next step's cannot always fill: at the
step's peak about 1 GB of glibc's heap was free and unusable (SmolLM2-135M, DPO, the README).

tcmalloc (gperftools' `libtcmalloc_minimal`, Debian's `libtcmalloc-minimal4`) keeps freed blocks
by size class and fragments far less: the same step peaked 0.9-1.4 GB lower and ran as fast or
faster. An allocator can only be chosen before the process starts, so the `unitune` command
(`preload`) starts itself again with tcmalloc in `LD_PRELOAD` when the library is installed; the
variable is removed again in the new process, so the programs it starts keep their own.

`UNITUNE_MALLOC`: `auto` (the default): tcmalloc when installed, else glibc tuned; `glibc`:
glibc tuned; `default`: glibc as it is. A user's own `LD_PRELOAD` and `MALLOC_MMAP_MAX_` /
`MALLOC_TRIM_THRESHOLD_` win. Elsewhere (musl, macOS, Windows) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # 2 GiB: the most mallopt's int argument holds
SETTINGS = {
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
}


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


REEXEC = "UNITUNE_MALLOC_PRELOAD"  # set only for the process `preload` starts
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}  # no line per block over 1 GiB


def in_use() -> str:
    """The allocator this process runs on: `tcmalloc`, `jemalloc`, `glibc`, or "" (another C
    library, or no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return ""
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if _glibc() is not None else ""


def tcmalloc_library() -> str | None:
    """The name the loader knows tcmalloc by on this machine (`libtcmalloc_minimal.so.4`), or
    None where it is not installed; found without loading it."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC)), None)


def preload() -> None:
    """Start this process again with tcmalloc preloaded, where `UNITUNE_MALLOC` is `auto` (or
    unset), the process runs on glibc, the user preloads nothing, and the library is installed;
    otherwise return. In the restarted process it removes its own `LD_PRELOAD` (and returns even
    where the loader could not preload the library: no loop)."""
    if os.environ.pop(REEXEC, None) is not None:
        os.environ.pop("LD_PRELOAD", None)
        return
    if os.environ.get("UNITUNE_MALLOC", "auto").lower() != "auto" or os.environ.get("LD_PRELOAD"):
        return
    if in_use() != "glibc":
        return
    lib = tcmalloc_library()
    if lib is None:
        return
    env = {**QUIET, **os.environ, "LD_PRELOAD": lib, REEXEC: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def tune() -> dict[str, int]:
    """Apply the settings the environment does not already choose; returns what was set, by
    environment-variable name (empty where nothing was done, or where the process does not run
    on glibc's allocator)."""
    if os.environ.get("UNITUNE_MALLOC", "").lower() == "default" or in_use() != "glibc":
        return {}
    libc = _glibc()
    if libc is None:
        return {}
    done = {}
    for name, (param, value) in SETTINGS.items():
        if name in os.environ:  # the user's choice, applied by glibc at start-up
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            done[name] = value
    return done
