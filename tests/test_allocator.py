"""unitune tunes glibc's allocator from inside the process (`allocator.py`): large blocks stay in
the heap instead of a fresh mmap per allocation, and a user's own settings win."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from unitune.core.allocator import tune

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
done = tune() if sys.argv[1] == "tune" else {}
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)  # a 64 MiB block, as an activation buffer
print(json.dumps({"done": done, "mmapped": libc.mallinfo2().hblkhd - before}))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def probe(mode: str, **env) -> dict:
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


@glibc
def test_large_blocks_stay_in_the_heap_once_tuned():
    assert probe("plain")["mmapped"] >= 64 << 20  # glibc's default: its own mmap
    tuned = probe("tune")
    assert tuned["mmapped"] == 0
    assert tuned["done"] == {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2**31 - 1}


@glibc
def test_the_user_s_settings_win():
    mine = probe("tune", MALLOC_MMAP_MAX_="65536")
    assert "MALLOC_MMAP_MAX_" not in mine["done"] and mine["mmapped"] >= 64 << 20
    assert probe("tune", UNITUNE_MALLOC="default")["done"] == {}
