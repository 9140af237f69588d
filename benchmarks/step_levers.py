"""Each lever on the training step's speed, measured alone on the same DPO-shaped batch, in one
process: the forward and backward of `sequence_logps` (what `unitune train` runs per step) on
SmolLM2-135M-Instruct, 8 sequences (4 pairs) of the benchmark's joined demo records (`--join 8`
of `train_vs_trl.py`: about 215 tokens each), then each lever alone against the baseline.

    python benchmarks/step_levers.py [--reps 4] [--levers baseline,eager,compile,...]

Levers: `eager` attention instead of SDPA; `compile`: `torch.compile` of the decoder
(inductor; its compile time is reported apart); `recompute`: the chunked head's logits kept for
backward instead of recomputed in it (what `unitune train` does); `bf16`: bf16 autocast
(`train.mixed_precision: bf16`); `threads1`: one intra-op thread; `foreach` / `for-loop`
AdamW against the fused one (the optimizer step alone). Seconds are the median of `--reps`
after one warm-up; nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_name  # noqa: E402
from train_vs_trl import DEMO, subset  # noqa: E402

LEVERS = ("baseline", "eager", "compile", "recompute", "bf16", "threads1", "optimizer")


def batch(tok, join: int, pairs: int) -> dict[str, torch.Tensor]:
    """`pairs` joined demo pairs as one right-padded batch: chosen rows, then rejected rows."""
    path = subset(DEMO / "pref_train.jsonl", pairs, Path(tempfile.mkdtemp()) / "p.jsonl", join)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    seqs = []
    for side in ("chosen", "rejected"):
        for r in rows:
            template = tok.apply_chat_template
            prompt = template(r["prompt"], tokenize=False, add_generation_prompt=True)
            full = template(r["prompt"] + r[side], tokenize=False)
            p, f = tok(prompt)["input_ids"], tok(full)["input_ids"]
            seqs.append((f, len(p)))
    width = max(len(f) for f, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id or 0)
    mask, target = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (f, n) in enumerate(seqs):
        ids[i, : len(f)], mask[i, : len(f)], target[i, n : len(f)] = torch.tensor(f), 1, 1
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def kept_logps(model, input_ids, attention_mask, target_mask):
    """`sequence_logps` with the head's logits kept for backward instead of recomputed (the
    `recompute` lever's alternative): the same chunks, no checkpoint."""
    from unitune.models.logprobs import _chunk_logp

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    mask = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    pos = mask.nonzero()
    rows, targets = hidden.last_hidden_state[pos[:, 0], pos[:, 1]], input_ids[:, 1:][mask]
    head = model.get_output_embeddings()
    logp = torch.cat([_chunk_logp(rows[i : i + 1024], head, targets[i : i + 1024])
                      for i in range(0, rows.shape[0], 1024)])  # fmt: skip
    return torch.zeros(input_ids.shape[0]).index_add(0, pos[:, 0], logp), mask.sum(1)


def step_seconds(model, b, reps: int, *, keep: bool = False, autocast: bool = False) -> float:
    """Median seconds of forward + backward of the batch's summed log-probs."""
    from unitune.models.logprobs import sequence_logps

    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logp, _ = (kept_logps if keep else sequence_logps)(model, **b)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def optimizer_seconds(model, reps: int) -> dict[str, float]:
    out = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True}),
                     ("for-loop", {"foreach": False})):  # fmt: skip
        opt = torch.optim.AdamW(params, lr=1e-6, **kw)
        times = []
        for i in range(reps + 1):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            t = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
        del opt
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--join", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--levers", default=",".join(LEVERS))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitune.models.builtin import smollm2_cache_dir

    path = smollm2_cache_dir()
    tok = AutoTokenizer.from_pretrained(path)
    b = batch(tok, args.join, args.pairs)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch "
          f"{tuple(b['input_ids'].shape)}, {int(b['attention_mask'].sum())} real tokens, "
          f"{int(b['target_mask'].sum())} response tokens")  # fmt: skip

    def fresh(attn: str = "sdpa"):
        load = AutoModelForCausalLM.from_pretrained
        return load(path, dtype=torch.float32, attn_implementation=attn).train()

    results: dict[str, float] = {}
    levers = args.levers.split(",")
    model = fresh()
    base = step_seconds(model, b, args.reps)
    results["baseline (sdpa, fp32, head recomputed in backward)"] = base
    if "recompute" in levers:
        results["head logits kept, not recomputed"] = step_seconds(model, b, args.reps, keep=True)
    if "bf16" in levers:
        results["bf16 autocast"] = step_seconds(model, b, args.reps, autocast=True)
    if "threads1" in levers:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        results["1 thread"] = step_seconds(model, b, args.reps)
        torch.set_num_threads(n)
    if "optimizer" in levers:
        for name, sec in optimizer_seconds(model, args.reps).items():
            results[f"AdamW {name} (optimizer step alone)"] = sec
    if "eager" in levers:
        results["eager attention"] = step_seconds(fresh("eager"), b, args.reps)
    if "compile" in levers:
        m = fresh()
        t = time.perf_counter()
        m.model.compile(dynamic=True)  # the decoder, once (its layers differ in constants)
        step_seconds(m, b, 1)  # compiles
        compile_s = time.perf_counter() - t
        results[f"torch.compile of the decoder (compiled in {compile_s:.0f} s)"] = step_seconds(
            m, b, args.reps
        )
    print("\n| lever | s | vs baseline |\n|---|---|---|")
    for name, sec in results.items():
        ratio = "" if "optimizer" in name else f"{base / sec:.2f}x"
        print(f"| {name} | {sec:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
