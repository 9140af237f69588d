"""unitune tunes glibc's allocator from inside the process (`allocator.py`): large blocks stay in
the heap instead of a fresh mmap per allocation, and a user's own settings win."""

import os
import platform
import subprocess
import sys

import pytest

from unitune.core.allocator import tcmalloc_library

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
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
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


PRELOAD = """
import ctypes.util, os, sys
from unitune.core.allocator import in_use, preload, tune
if len(sys.argv) > 1:  # the library name the machine would give
    find = ctypes.util.find_library
    ctypes.util.find_library = lambda name: sys.argv[1] if "tcmalloc" in name else find(name)
preload()
print(in_use(), os.environ.get("LD_PRELOAD"), bool(tune()))
"""

tcmalloc = pytest.mark.skipif(
    tcmalloc_library() is None,
    reason="tcmalloc not installed (make setup installs Debian's libtcmalloc-minimal4)",
)


def preload_probe(*args: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MALLOC_", "UNITUNE_MALLOC", "LD_PRELOAD"))}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", PRELOAD, *args], env={**clean, **env},
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return out.stdout.split()


@glibc
@tcmalloc
def test_the_command_restarts_itself_on_tcmalloc():
    # on tcmalloc, its LD_PRELOAD gone again (what the process starts keeps its own), glibc
    # left alone
    assert preload_probe() == ["tcmalloc", "None", "False"]
    # asked for glibc, or the user's own preload: glibc tuned / theirs, no restart
    assert preload_probe(UNITUNE_MALLOC="glibc") == ["glibc", "None", "True"]
    assert preload_probe(UNITUNE_MALLOC="default") == ["glibc", "None", "False"]


@glibc
def test_a_library_the_loader_refuses_does_not_loop():
    # the restarted process finds no tcmalloc mapped (the loader ignored the name) and goes on
    # on glibc, tuned, instead of starting itself again
    assert preload_probe("libunitune-no-such-allocator.so") == ["glibc", "None", "True"]


@glibc
@tcmalloc
def test_the_cli_runs_on_tcmalloc(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "from unitune.cli import app, main\n"
        "from unitune.core.allocator import in_use\n"
        "app.command('probe')(lambda: print(in_use()))\n"
        "main()\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("UNITUNE_MALLOC", "LD_"))}
    out = subprocess.run([sys.executable, str(script), "probe"], env=clean,
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert out.stdout.split() == ["tcmalloc"]
