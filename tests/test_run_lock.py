"""One run per output directory: a second run is refused at start-up naming the holder; a killed
holder's lock does not block a resume (the kernel drops a flock with its process)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from unitune.cli import app
from unitune.training.rundir import LOCK_FILE, RunDirLocked, lock_output_dir

runner = CliRunner()

HOLD = """
import sys, time
from unitune.training.rundir import lock_output_dir
lock = lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _holder_pid(out: Path, timeout: float = 120.0) -> int:
    """The pid written in `out`'s lock file, once a process has written it."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            return json.loads((out / LOCK_FILE).read_text())["pid"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.05)
    raise AssertionError(f"no process locked {out}")


def test_a_lock_is_exclusive_and_released(tmp_path):
    with lock_output_dir(tmp_path / "run") as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        try:
            lock_output_dir(tmp_path / "run")  # another open file: flock refuses it
        except RunDirLocked as e:
            assert f"pid {os.getpid()}" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError("a second lock on the same directory was granted")
    assert not (tmp_path / "run").exists()  # it made the directory, nothing was written: gone
    with lock_output_dir(tmp_path / "a" / "b" / "run") as lock:  # released: free again
        (lock.path.parent / "config.yaml").write_text("x")
    assert (tmp_path / "a" / "b" / "run" / "config.yaml").exists()  # a written run stays


def test_a_second_run_is_refused_and_the_first_finishes(tiny_config, tmp_path):
    raw = tiny_config("alright", max_steps=3)
    out = Path(raw["output_dir"])
    path = _config(tmp_path, raw)
    first = subprocess.Popen(
        [sys.executable, "-c", "from unitune.cli import app; app()", "train", str(path),
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert _holder_pid(out) == first.pid
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lock while the second starts
        try:
            res = runner.invoke(app, ["train", str(path), "--no-progress"])
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert res.exit_code == 2, res.output
        line = " ".join(res.output.split())
        assert f"in use by another run (pid {first.pid} on host" in line
        assert "Traceback" not in res.output
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["sft"] + summary["steps"]["pref"] == 3


def test_a_killed_holder_does_not_block_a_resume(tiny_config, tmp_path):
    raw = tiny_config("alright", max_steps=2, save_every=1)
    out = Path(raw["output_dir"])
    path = _config(tmp_path, raw)
    res = runner.invoke(app, ["train", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        more = ["--set", "train.max_steps=4", "--no-progress"]
        res = runner.invoke(app, ["train", str(path), "--resume", *more])
        assert res.exit_code == 2 and f"pid {holder.pid}" in res.output
        holder.kill()  # SIGKILL: no clean-up runs; the lock file stays with its pid in it
        holder.wait()
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
        res = runner.invoke(app, ["train", str(path), "--resume", *more])
    finally:
        if holder.poll() is None:
            holder.kill()
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["sft"] + summary["steps"]["pref"] == 4
