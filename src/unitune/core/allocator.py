"""glibc's allocator, tuned for training from inside the process.

Training allocates and frees the same large activation and gradient buffers every step. glibc
serves each allocation above 128 KiB-32 MiB (its adaptive mmap threshold) with a fresh `mmap` and
returns it with `munmap`, so every step pays page faults and zeroing of memory it just gave back,
and trims the heap top as soon as it is free. `M_MMAP_MAX = 0` keeps large blocks in the heap and
a high `M_TRIM_THRESHOLD` keeps freed memory for the next step. These are the settings of the
environment variables `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`, which glibc reads
only at start-up; `mallopt` sets the same at any time, so `unitune` applies them itself.

A user's own `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` win; `UNITUNE_MALLOC=default` leaves
glibc as it is. Elsewhere (musl, macOS, Windows) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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


def tune() -> dict[str, int]:
    """Apply the settings the environment does not already choose; returns what was set, by
    environment-variable name (empty where nothing was done)."""
    if os.environ.get("UNITUNE_MALLOC", "").lower() == "default":
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
