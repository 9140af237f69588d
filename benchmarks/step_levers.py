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

    python benchmarks/step_levers.py --ops [--precision bf16] [--reps 3]

`--ops` instead takes the baseline step apart op by op (on glibc tuned as `unitune` tunes it
where tcmalloc is not installed): every aten call of one step is recorded and replayed alone at its
exact shapes and strides, and the table gives the GEMMs (with their FLOPs and rate against the
GEMM peak `train_vs_trl.py` measures, in the same process), the attention kernels, the head's
log-softmax, the rest (the largest named), and the step's time less all the replays: what runs
between the kernels. No profiler: `torch.profiler` more than doubled this step.

    python benchmarks/step_levers.py --memory [--precision bf16]

`--memory` gives the live tensors by kind (activations, optimizer state, weights, ...) at the
peak of one whole training step (forward, backward, clipping, fused AdamW), from
`torch.profiler`'s memory timeline: what the peak RSS would be with no allocator overhead.
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
from train_vs_trl import DEMO, gemm_peak, subset  # noqa: E402

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


def backward(model, b, *, keep: bool = False, autocast: bool = False) -> None:
    """Forward and backward of the batch's summed log-probs; the gradients left in `.grad`."""
    from unitune.models.logprobs import sequence_logps

    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logp, _ = (kept_logps if keep else sequence_logps)(model, **b)
    logp.sum().backward()


def one_step(model, b, *, keep: bool = False, autocast: bool = False) -> None:
    """`backward`, the gradients dropped."""
    backward(model, b, keep=keep, autocast=autocast)
    model.zero_grad(set_to_none=True)


def step_seconds(model, b, reps: int, *, keep: bool = False, autocast: bool = False) -> float:
    """Median seconds of `one_step` over `reps` after a warm-up."""
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        one_step(model, b, keep=keep, autocast=autocast)
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


GEMMS = ("mm", "addmm", "bmm")
ATTENTION = ("_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward")  # fmt: skip
HEAD = ("_log_softmax", "_log_softmax_backward_data", "logsumexp")


def op_category(name: str) -> str:
    if name in GEMMS:
        return "GEMMs"
    if name in ATTENTION:
        return "attention (SDPA kernels)"
    if name in HEAD:
        return "head log-softmax"
    return "elementwise, norms, copies, the rest"


def is_spec(x) -> bool:
    """Whether `x` is a recorded tensor argument (`record_step`): ("float", shape, stride, dtype,
    offset) or ("real", the tensor)."""
    return isinstance(x, tuple) and bool(x) and x[0] in ("float", "real")


def float_shapes(args) -> list[tuple[int, ...]]:
    """The shapes of a recorded call's floating tensor arguments, in order."""
    return [a[1] for a in args if is_spec(a) and a[0] == "float"]


def gemm_flops(name: str, shapes: list[tuple[int, ...]]) -> float:
    """FLOPs of one mm / addmm / bmm call from its operands' shapes."""
    a, b = shapes[-2], shapes[-1]  # addmm's bias comes first
    return 2.0 * (a[0] if name == "bmm" else 1) * a[-2] * a[-1] * b[-1]


def record_step(model, b, autocast: bool = False) -> list[tuple]:
    """Every aten call of one `one_step`, in order, as (name, argument spec): floating tensors by
    shape, stride and dtype (their values do not change a kernel's time), integer and boolean
    tensors (indices, masks: they set output shapes) cloned whole, other arguments as they are."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    calls: list[tuple] = []

    def spec(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return ("float", tuple(x.shape), tuple(x.stride()), x.dtype, x.storage_offset())
        return ("real", x.detach().clone())

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            calls.append((func, tree_map(spec, args), tree_map(spec, kwargs)))
            return func(*args, **kwargs)

    with Recorder():
        one_step(model, b, autocast=autocast)
    return calls


def replay_seconds(calls: list[tuple], reps: int) -> tuple[list[float], list[str]]:
    """Each recorded call run again in order on random floating tensors of its arguments' exact
    shapes and strides (the integer ones as recorded); per call the median over `reps` rounds.
    Returns the seconds per call (nan where a call could not be replayed) and what failed."""
    from torch.utils._pytree import tree_map

    pool: dict[tuple, torch.Tensor] = {}

    def make(x):
        if not is_spec(x):
            return x
        if x[0] == "real":
            return x[1]
        _, shape, stride, dtype, offset = x
        key = (shape, stride, dtype, offset)
        if key not in pool:
            size = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True) if n)
            base = torch.randn(size).to(dtype)
            pool[key] = base.as_strided(shape, stride, offset)
        return pool[key]

    ready = []
    for func, args, kwargs in calls:
        a = tree_map(make, args, is_leaf=is_spec)
        k = tree_map(make, kwargs, is_leaf=is_spec)
        ready.append((func, a, k))
    times: list[list[float]] = [[] for _ in ready]
    failed: list[str] = []
    torch.set_flush_denormal(True)  # in-place ops repeated on random data must not slow down
    for r in range(reps + 1):
        for i, (func, a, k) in enumerate(ready):
            t = time.perf_counter()
            try:
                func(*a, **k)
            except Exception:  # noqa: BLE001 - a call that cannot run again is reported
                if r == 0:
                    failed.append(func.__name__)
                times[i].append(float("nan"))
                continue
            if r:
                times[i].append(time.perf_counter() - t)
    torch.set_flush_denormal(False)
    return [statistics.median(t) if t else float("nan") for t in times], failed


def op_breakdown(model, b, reps: int, peak: float, autocast: bool = False) -> str:
    """Where the baseline step's time goes, without a profiler (which, here, more than doubled
    the step and charged most of it to small operations): every aten call of one step recorded,
    each replayed alone in order at its exact shapes, and the step's time less the sum of the
    replays is what runs between kernels (Python, autograd, dispatch, allocation) and what the
    kernels lose in the step (caches)."""
    plain = step_seconds(model, b, reps, autocast=autocast)
    calls = record_step(model, b, autocast)
    seconds, failed = replay_seconds(calls, reps)
    groups: dict[str, list[float]] = {}
    rest: dict[str, list[float]] = {}
    for (func, args, _), sec in zip(calls, seconds, strict=True):
        name = func.__name__.split(".")[0]
        cat = op_category(name)
        g = groups.setdefault(cat, [0.0, 0.0, 0])
        if sec == sec:  # not nan
            g[0] += sec
        g[2] += 1
        if cat == "GEMMs":
            g[1] += gemm_flops(name, float_shapes(args))
        elif cat.startswith("elementwise") and sec == sec:
            r = rest.setdefault(name, [0.0, 0])
            r[0] += sec
            r[1] += 1
    kernels = sum(g[0] for g in groups.values())
    lines = [f"Step (forward and backward) {plain:.2f} s; {len(calls)} aten calls, each replayed "
             f"alone at its shapes: {kernels:.2f} s; GEMM peak {peak:.0f} GFLOP/s.", "",
             "| part | s/step | share | calls | GFLOP | GFLOP/s | of GEMM peak |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for cat, (sec, flops, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        rate = flops / sec / 1e9 if flops else 0.0
        cells = [f"{flops / 1e9:.1f}", f"{rate:.0f}", f"{rate / peak:.0%}"] if flops else [""] * 3
        lines.append(f"| {cat} | {sec:.3f} | {sec / plain:.0%} | {n} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    gap = plain - kernels
    lines.append(f"| between and around kernels (step less the replays) | {gap:.3f} | "
                 f"{gap / plain:.0%} |  |  |  |  |")  # fmt: skip
    top = sorted(rest.items(), key=lambda kv: -kv[1][0])[:12]
    named = ", ".join(f"{k} {s:.3f} s ({n})" for k, (s, n) in top)
    lines += ["", f"Largest of the rest (s/step, calls): {named}."]
    if failed:
        lines.append(f"Not replayed ({len(failed)} calls, their time is in the last row): "
                     + ", ".join(sorted(set(failed))) + ".")  # fmt: skip
    return "\n".join(lines)


def memory_breakdown(model, b, autocast: bool = False) -> str:
    """Live tensor memory by kind at the peak of one training step (forward, backward, clipping,
    fused AdamW, gradients set to None as `unitune train` does), from `torch.profiler`'s memory
    timeline over the second step (the first creates the optimizer state)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_COLORS, MemoryProfileTimeline

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def step() -> None:
        backward(model, b, autocast=autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    kw = {"profile_memory": True, "record_shapes": True, "with_stack": True}
    with profile(activities=[ProfilerActivity.CPU], **kw) as prof:
        step()
    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    names = ["?"] + [c.name.lower() if c else "unknown" for c in _CATEGORY_TO_COLORS]
    parts = sorted(((sizes[at][i], names[i]) for i in range(1, len(names))), reverse=True)
    gb = 1e9
    shown = ", ".join(f"{name} {n / gb:.2f}" for n, name in parts if n)
    when = (times[at] - times[0]) / (times[-1] - times[0])
    return (f"Live tensors at the step's peak ({when:.0%} of the way through it): "
            f"{totals[at] / gb:.2f} GB: {shown}.")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--join", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--ops", action="store_true", help="take the baseline step apart op by op")
    p.add_argument("--memory", action="store_true", help="live memory by kind at the peak")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="--ops, --memory: the step in fp32 or under bf16 autocast")  # fmt: skip
    args = p.parse_args()
    if args.ops or args.memory:
        from unitune.core.allocator import tune

        tune()
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
    if args.memory:
        print(memory_breakdown(model, b, args.precision == "bf16"))
        return
    if args.ops:
        peak = max(gemm_peak(2048, args.precision), gemm_peak(2048, args.precision))
        print(op_breakdown(model, b, args.reps, peak, args.precision == "bf16"))
        return
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
