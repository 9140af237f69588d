"""DPO step time and peak memory: unitune against TRL, same model, data and batch, one process tree.

    python benchmarks/dpo_step.py [--steps 8] [--batch-size 8] [--max-length 128]

The parent runs each framework in its own child process (fresh allocator, own peak RSS), one after
the other, and prints the ratio TRL / unitune of the median step time and of the peak RSS. Both
train SmolLM2-135M-Instruct (the embedded default, full fine-tuning, fp32) with DPO (beta 0.1)
on the demo preference data, AdamW lr 1e-6, no gradient clipping difference (1.0 in both).
The reference is what each framework does by default: TRL keeps a reference model and runs it
every step; unitune computes reference log-probs once (cached on disk) before training — that
one-off cost is reported separately as `ref_s`. `--trl-precompute` also runs TRL with
`precompute_ref_log_probs=True`.

Needs `pip install trl` (a bench-only dependency; it installs against torch 2.13.0 without
pulling another torch). The first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from harness import MALLOC_ENV, peak_rss_mb, print_ratio_table, report, run_child

DEMO = Path(__file__).resolve().parents[1] / "src" / "unitune" / "demo_data" / "pref_train.jsonl"


def worker_unitune(args) -> dict:
    import torch

    from unitune.config import ModelConfig
    from unitune.data import Pair, collate, length_batches, load_preference
    from unitune.models import cache_root, load_model, model_fingerprint
    from unitune.objectives import REGISTRY, PairLogps, SeqLogps
    from unitune.refcache import reference_logps
    from unitune.trainer import PolicyLogps, adamw, flatten

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="builtin:smollm2-135m"))
    pairs, _ = load_preference(args.data, tok, max_length=args.max_length)
    pairs = pairs[: args.batch_size * (args.steps + args.warmup)]
    policy = PolicyLogps(model, chunk_size=1024)
    t = time.perf_counter()
    ref, _, _ = reference_logps(
        policy,
        flatten(pairs),
        model_fp=model_fingerprint(model),
        cache_dir=Path(args.cache) if args.cache else cache_root(),
        pad_id=tok.pad_token_id,
        batch_size=16,
        device=torch.device("cpu"),
    )
    ref_s = time.perf_counter() - t
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    n = len(pairs)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    batches = length_batches(lengths, args.batch_size, seed=0, shuffle=True)
    times = []
    for step, idx in enumerate(batches[: args.steps + args.warmup]):
        t = time.perf_counter()
        sel: list[Pair] = [pairs[i] for i in idx]
        batch = collate([p.chosen for p in sel] + [p.rejected for p in sel], tok.pad_token_id)
        logp, cnt = policy(**batch)
        b = len(idx)
        lp = PairLogps(
            SeqLogps(logp[:b], cnt[:b], ref[idx]),
            SeqLogps(logp[b:], cnt[b:], ref[[i + n for i in idx]]),
        )
        loss = REGISTRY["dpo"].loss(lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "ref_s": ref_s, "peak_rss_mb": peak_rss_mb()}


def worker_trl(args, precompute: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from unitune.models import smollm2_cache_dir

    torch.manual_seed(0)
    path = smollm2_cache_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    n = args.batch_size * (args.steps + args.warmup)
    data = load_dataset("json", data_files=str(args.data), split="train").select(range(n))
    times, start = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            start["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - start["t"])

    cfg = DPOConfig(
        output_dir=str(Path(args.tmp) / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-6,
        beta=0.1,
        max_grad_norm=1.0,
        max_length=args.max_length,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        precompute_ref_log_probs=precompute,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Timer()]
    )
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    return {"step_s": statistics.median(times), "train_s": total, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--data", type=Path, default=DEMO)
    p.add_argument("--cache", default=None, help="unitune cache dir (default: the user cache)")
    p.add_argument("--tmp", default="/tmp/unitune-bench")
    p.add_argument("--trl-precompute", action="store_true")
    p.add_argument("--worker", choices=["unitune", "trl", "trl-precompute"])
    args = p.parse_args()
    if args.worker:
        fn = {
            "unitune": lambda: worker_unitune(args),
            "trl": lambda: worker_trl(args, False),
            "trl-precompute": lambda: worker_trl(args, True),
        }[args.worker]
        report(fn())
        return

    env = dict(os.environ, **MALLOC_ENV)
    results = {}
    workers = ["unitune", "trl"] + (["trl-precompute"] if args.trl_precompute else [])
    for w in workers:
        cmd = [sys.executable, __file__, "--worker", w] + [
            a for a in sys.argv[1:] if a != "--trl-precompute"
        ]
        results[w] = run_child(cmd, env, what=w)
        print(f"{w:15s} {results[w]}", flush=True)
    print(
        f"\nDPO step, SmolLM2-135M fp32, batch {args.batch_size} pairs, "
        f"max_length {args.max_length}, {os.cpu_count()} CPUs"
    )
    print_ratio_table(results, "unitune")


if __name__ == "__main__":
    main()
