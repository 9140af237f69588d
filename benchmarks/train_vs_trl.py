"""unitune against TRL on the path users run: `unitune train` and TRL's trainers, same model, data,
precision and batch, one process tree.

    python benchmarks/train_vs_trl.py [--jobs dpo,sft,kto,ift,schedules] [--examples 24]
                                      [--batch-size 4] [--max-length 512] [--update-readme]

Each measured thing runs in its own child process of this one (fresh allocator; its peak RSS read
by `wait4`), one after the other, so nothing else competes for the cores:

- unitune: the command line itself, `python -m unitune.cli train CONFIG` (on the allocator the
  CLI picks, as for any user: tcmalloc where installed, else glibc tuned); step times are the
  `step_s` of `metrics.jsonl`.
- TRL 1.16: `DPOTrainer` / `SFTTrainer` / `KTOTrainer` with their defaults for the reference
  (a reference model run every step), step times from a `TrainerCallback`; on glibc, with
  unitune's glibc settings (`unitune.core.allocator.tune()`: faster than TRL's own default).

Both train SmolLM2-135M-Instruct (the embedded default, full fine-tuning, fp32 unless
`--precision bf16`) on the demo data (`src/unitune/study/demo_data`), AdamW at lr 1e-6,
clipping 1.0, `--batch-size` examples (pairs for DPO) per step, no evaluation while training,
for two epochs of `--examples` examples. Only the second epoch is timed (the first warms up),
so both frameworks are timed on exactly the same examples and tokens
whatever order they batch them in (unitune
groups by length, TRL shuffles): the epoch's time, its real tokens per second (unitune's count of
those examples' tokens), and the mean step time. "MFU" is 6 x non-embedding parameters x
tokens/s (the usual training-FLOPs estimate; no reference pass counted) over the GEMM peak: one
decoder layer's GEMMs at 2,048 rows, each at its best of three rounds, measured in this process
before and after the children (the higher of the two).
`--from-results results.json` renders the table (and `--update-readme`) from a saved run.

Rows for IFT and the joint schedules are unitune only: TRL has neither. They report their step
cost relative to SFT (IFT) and to `sequential` (schedules). `--update-readme` writes the table
between the `<!-- bench:train_vs_trl -->` markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu_name, run_measured, update_readme

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "unitune" / "study" / "demo_data"
PARAMS = 106_203_456  # SmolLM2-135M without its (tied) 49152 x 576 embedding


# ------------------------------------------------------------------------------ measurement
def gemm_peak(tokens: int, dtype: str, rounds: int = 3) -> float:
    """GFLOP/s of one SmolLM2-135M decoder layer's GEMMs (q, k, v, o, gate, up, down at `tokens`
    rows, forward shapes), in this process: the layer's FLOPs over its GEMMs' time, each GEMM
    timed at its best of `rounds` rounds (this virtual machine's speed drifts: the best is the
    peak it reached)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536),
              (1536, 576)]  # fmt: skip
    flops = seconds = 0.0
    for k, n in shapes:
        a, b = torch.randn(tokens, k, dtype=dt), torch.randn(k, n, dtype=dt)
        for _ in range(3):
            a @ b
        best, reps = float("inf"), 10
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, (time.perf_counter() - t) / reps)
        flops += 2 * tokens * k * n
        seconds += best
    return flops / seconds / 1e9


# ----------------------------------------------------------------------------------- data
def unpaired(pairs: Path, out: Path) -> Path:
    """The demo pairs as KTO's unpaired feedback: chosen desirable, rejected undesirable."""
    rows = []
    for line in pairs.read_text().splitlines():
        r = json.loads(line)
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def subset(path: Path, n: int, out: Path, join: int = 1) -> Path:
    """The first `n` examples of `path`; with `join` > 1 each example is `join` consecutive
    records made one: their user turns joined into one user message, their assistant turns
    (chosen, rejected) into one answer each (longer sequences with the demo's proportions of
    prompt and response)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()[: n * join]]
    if join > 1:
        rows = [_joined(rows[i : i + join]) for i in range(0, len(rows) - join + 1, join)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return out


def _joined(records: list[dict]) -> dict:
    def text(messages: list[dict], role: str) -> str:
        return "\n".join(m["content"] for m in messages if m["role"] == role)

    def turn(role: str, parts: list[str]) -> list[dict]:
        return [{"role": role, "content": "\n\n".join(parts)}]

    if "messages" in records[0]:
        return {
            "messages": turn("user", [text(r["messages"], "user") for r in records])
            + turn("assistant", [text(r["messages"], "assistant") for r in records])
        }
    return {"prompt": turn("user", [text(r["prompt"], "user") for r in records]),
            **{k: turn("assistant", [text(r[k], "assistant") for r in records])
               for k in ("chosen", "rejected")}}  # fmt: skip


# -------------------------------------------------------------------------------- unitune
# job -> (schedule, sft objective, preference objective, data slot(s))
UNITUNE_JOBS = {
    "dpo": ("pref", "sft", "dpo"),
    "sft": ("sft", "sft", "dpo"),
    "kto": ("pref", "sft", "kto"),
    "ift": ("sft", "ift", "dpo"),
    "sequential": ("sequential", "sft", "dpo"),
    "mix": ("mix", "sft", "dpo"),
    "alright": ("alright", "sft", "dpo"),
    "maxright": ("maxright", "sft", "dpo"),
}


# `--memory-options`: the DPO job again with each option that trades time or fidelity for memory
MEMORY_OPTIONS = {
    "gradient checkpointing": {"train": {"gradient_checkpointing": True}},
    "bf16 weights and optimizer": {"model": {"dtype": "bfloat16"}},
    "LoRA r=16, all linear layers": {"model": {"lora": {"r": 16, "alpha": 32, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}},
}  # fmt: skip


def unitune_run(
    job: str, args, work: Path, files: dict[str, Path], env: dict, overrides: dict | None = None
) -> dict:
    import yaml

    schedule, sft_obj, pref_obj = UNITUNE_JOBS[job]
    data = {"max_length": args.max_length}
    if schedule != "pref":
        data["sft"] = {"train": str(files["sft"]), "eval": str(files["sft_eval"])}
    if schedule != "sft":
        kto = pref_obj == "kto"
        data["pref"] = {"train": str(files["kto" if kto else "pref"]),
                        "eval": str(files["kto_eval" if kto else "pref_eval"])}  # fmt: skip
    steps = 2 * steps_per_epoch(args)
    cfg = {
        "name": f"bench-{job}",
        "model": {"name": args.model},
        "data": data,
        "objectives": {"sft": {"name": sft_obj}, "pref": {"name": pref_obj}},
        "schedule": {"name": schedule, "lam": 0.5, **({"k": 2} if schedule == "maxright" else {})},
        "train": {
            "max_steps": steps,
            "batch_size": args.batch_size,
            "lr": 1e-6,
            "max_grad_norm": 1.0,
            "eval_every": 10**6,
            "eval_batch_size": 16,
            "save_model": False,
            "mixed_precision": "bf16" if args.precision == "bf16" else "no",
            "profile": True,  # phase seconds and memory floor in summary.json (free on a CPU)
        },  # fmt: skip
        "output_dir": str(work / f"unitune-{job}"),
        "cache_dir": str(work / "cache"),
    }
    for section, values in (overrides or {}).items():
        cfg[section] = {**cfg[section], **values}
    path = work / f"{job}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "unitune.cli", "train", str(path), "--no-progress"]
    t = time.perf_counter()
    _, rss = run_measured(cmd, env, f"unitune {job}")
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (work / f"unitune-{job}" / "metrics.jsonl").open()]
    per_step = {r["step"]: r for r in rows if r["type"] == "train"}  # one per step
    timed = [per_step[s] for s in sorted(per_step) if s > steps_per_epoch(args)]
    summary = json.loads((work / f"unitune-{job}" / "summary.json").read_text())
    return {"epoch_s": sum(r["step_s"] for r in timed), "tokens": sum(r["tokens"] for r in timed),
            "peak_rss_mb": rss, "wall_s": wall, "profile": summary.get("profile")}  # fmt: skip


# ------------------------------------------------------------------------------------ TRL
def trl_worker(job: str, args) -> None:
    """Child: TRL's trainer for `job`; prints one RESULT line."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from unitune.core.allocator import tune
    from unitune.models.builtin import smollm2_cache_dir

    tune()  # glibc as unitune tunes it where tcmalloc is not installed
    torch.manual_seed(0)
    path = smollm2_cache_dir()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    data = load_dataset("json", data_files=str(args.data_file), split="train")
    times, start = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            start["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > steps_per_epoch(args):  # the second epoch
                times.append(time.perf_counter() - start["t"])

    common = dict(
        output_dir=str(Path(args.work) / f"trl-{job}"), per_device_train_batch_size=args.batch_size,
        max_steps=2 * steps_per_epoch(args), learning_rate=1e-6, max_grad_norm=1.0,
        report_to="none", save_strategy="no", logging_steps=10**6, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=dtype == torch.bfloat16,
    )  # fmt: skip
    if job == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        cfg = Config(beta=0.1, max_length=args.max_length, **common)
    elif job == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        cfg = Config(beta=0.1, max_length=args.max_length, **common)
    else:
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

        cfg = Config(max_length=args.max_length, packing=False, **common)
    trainer = Trainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                      callbacks=[Timer()])  # fmt: skip
    trainer.train()
    print("RESULT " + json.dumps({"epoch_s": sum(times)}), flush=True)


def trl_run(job: str, args, work: Path, data_file: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--trl-worker", job, "--data-file", str(data_file),
           "--work", str(work), "--examples", str(args.examples),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--precision", args.precision]  # fmt: skip
    t = time.perf_counter()
    out, rss = run_measured(cmd, env, f"TRL {job}")
    wall = time.perf_counter() - t
    result = json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])
    return {**result, "peak_rss_mb": rss, "wall_s": wall}


# ----------------------------------------------------------------------------------- main
def steps_per_epoch(args) -> int:
    return args.examples // args.batch_size


def table(results: dict[str, dict], meta: dict) -> str:
    """The markdown table of the results (and the machine it ran on)."""
    head = ("| job | framework | s/epoch | s/step | tokens/s | MFU | peak RSS | x |\n"
            "|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    out = []
    for job, rows in results.items():
        base = rows.get("TRL") or rows.get("sft") or rows.get("sequential") or rows["unitune"]
        for fw, r in rows.items():
            speed = base["epoch_s"] / r["epoch_s"]
            pace = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
            ratio = "" if r is base else (
                f"{pace}, {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x memory"
            )  # fmt: skip
            mfu = 6 * meta.get("params", PARAMS) * r["tokens_per_s"] / (meta["peak"] * 1e9)
            out.append(
                f"| {job} | {fw} | {r['epoch_s']:.1f} | {r['epoch_s'] / meta['steps']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {mfu:.0%} | {r['peak_rss_mb'] / 1024:.2f} GB | "
                f"{ratio} |"
            )
    return (
        f"SmolLM2-135M-Instruct, {meta['precision']}, {meta['batch']} examples per step"
        + (f" (each {meta['join']} demo records joined)" if meta.get("join", 1) > 1 else "")
        + ", "
        f"max_length {meta['max_length']}, {meta['steps']} steps per timed epoch; "
        f"{meta['cpu']}, {meta['cores']} cores; GEMM peak {meta['peak']:.0f} GFLOP/s; "
        f"TRL {meta['trl']}, unitune {meta['unitune']}. `x`: against TRL (against SFT for IFT, "
        "against `sequential` for the other schedules).\n\n" + head + "\n".join(out) + "\n"
    )


# the LM head's shape (SmolLM2-135M): hidden size x vocabulary
HIDDEN, VOCAB = 576, 49152


def phase_flops(profile: dict, params: int = PARAMS) -> dict[str, float]:
    """FLOPs each phase of a mean step executes: the decoder's 2 (forward) and 4 (backward) per
    non-embedding parameter per token it runs (padding included: it is computed), the head's 2,
    2 (recompute) and 4 (backward) per hidden x vocabulary entry per response row. Attention's
    own products (a few % at ~220 tokens) are not counted."""
    c = profile["counts"]
    tokens, rows = c.get("padded_tokens", 0.0), c.get("head_rows", 0.0)
    head = 2 * HIDDEN * VOCAB * rows
    return {"forward": 2 * params * tokens, "backward": 4 * params * tokens, "head": head,
            "head_recompute": head if profile["seconds"].get("head_recompute") else 0.0,
            "head_backward": 2 * head}  # fmt: skip


def useful_flops(profile: dict, params: int = PARAMS) -> float:
    """The step's work as the issue counts it: 6 FLOPs per non-embedding parameter per real
    token, plus the head (forward and backward) on the response rows only."""
    c = profile["counts"]
    return 6 * params * c.get("tokens", 0.0) + 6 * HIDDEN * VOCAB * c.get("head_rows", 0.0)


def profile_table(label: str, profile: dict, peak: float, rss_mb: float) -> str:
    """A unitune job's mean step by phase (seconds, share, GFLOP/s and % of the GEMM peak) and
    its memory floor against the peak RSS."""
    flops = phase_flops(profile)
    total = profile["step_s"]
    rows = ["| phase | s/step | share | GFLOP | GFLOP/s | of GEMM peak |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, sec in profile["seconds"].items():
        f = flops.get(name, 0.0)
        rate = f"{f / sec / 1e9:.0f} | {f / sec / 1e9 / peak:.0%}" if f and sec > 0 else " | "
        gf = f"{f / 1e9:.1f}" if f else ""
        rows.append(f"| {name} | {sec:.3f} | {sec / total:.0%} | {gf} | {rate} |")
    useful = useful_flops(profile)
    rows.append(f"| **step** | {total:.3f} | 100% | {useful / 1e9:.1f} useful | "
                f"{useful / total / 1e9:.0f} | {useful / total / 1e9 / peak:.0%} |")  # fmt: skip
    c, m = profile["counts"], profile["memory_bytes"]
    pad = 1 - c.get("tokens", 0) / max(c.get("padded_tokens", 1), 1)
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in m.items() if k != "floor")
    return (
        f"{label}: mean of {profile['steps']} steps; per step {c.get('tokens', 0):.0f} real tokens "
        f"({pad:.0%} padding), {c.get('head_rows', 0):.0f} response rows through the head.\n\n"
        + "\n".join(rows)
        + f"\n\nMemory floor {m['floor'] / 1e9:.2f} GB ({parts}); peak RSS "
        f"{rss_mb * 2**20 / 1e9:.2f} GB = {rss_mb * 2**20 / m['floor']:.2f}x the floor"
        + (f", on {profile['allocator']}" if profile.get("allocator") else "")
        + ".\n"
    )


def main_parent(args) -> int:
    import torch
    import trl

    import unitune

    jobs = args.jobs.split(",")
    if "schedules" in jobs:
        jobs = [j for j in jobs if j != "schedules"] + ["sequential", "mix", "alright", "maxright"]
    n, spe = args.examples, steps_per_epoch(args)
    work = Path(tempfile.mkdtemp(prefix="unitune-bench-"))
    j = args.join
    files = {
        "sft": subset(DEMO / "sft_train.jsonl", n, work / "sft.jsonl", j),
        "pref": subset(DEMO / "pref_train.jsonl", n, work / "pref.jsonl", j),
        "sft_eval": subset(DEMO / "sft_eval.jsonl", 4, work / "sft_eval.jsonl", j),
        "pref_eval": subset(DEMO / "pref_eval.jsonl", 4, work / "pref_eval.jsonl", j),
    }
    files["kto"] = subset(unpaired(DEMO / "pref_train.jsonl", work / "all.jsonl"), n,
                          work / "kto.jsonl")  # fmt: skip
    files["kto_eval"] = unpaired(files["pref_eval"], work / "kto_eval.jsonl")
    torch.set_num_threads(os.cpu_count() or 1)
    peak = gemm_peak(2048, args.precision)  # about a DPO step's padded tokens (--join 8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results: dict[str, dict] = {}
    for job in jobs:
        u = unitune_run(job, args, work, files, env)
        rows = results.setdefault(job, {})
        rows["unitune"] = u
        if job == "dpo" and args.allocator:  # glibc instead of tcmalloc: tuned, then as it is
            tuned = {**env, "UNITUNE_MALLOC": "glibc"}
            rows["unitune, glibc tuned"] = unitune_run(job, args, work, files, tuned)
            plain = {**env, "UNITUNE_MALLOC": "default"}
            rows["unitune, glibc default allocator"] = unitune_run(job, args, work, files, plain)
        if job == "dpo" and args.trim_mb:  # heap kept up to one step's working set, not 2 GiB
            trim = {**env, "MALLOC_TRIM_THRESHOLD_": str(args.trim_mb * 2**20)}
            rows[f"unitune, trim threshold {args.trim_mb} MiB"] = unitune_run(
                job, args, work, files, trim
            )
        if job == "dpo" and args.compile:  # the decoder compiled at start-up (outside s/epoch)
            c = unitune_run(job, args, work, files, env, {"train": {"compile": True}})
            rows["unitune, train.compile"] = c
            print(f"train.compile: {c['wall_s']:.0f} s in all against {u['wall_s']:.0f} s "
                  "eager", flush=True)  # fmt: skip
        if job == "dpo" and args.memory_options:
            for name, change in MEMORY_OPTIONS.items():
                rows[f"unitune, {name}"] = unitune_run(job, args, work, files, env, change)
        if job in ("dpo", "sft", "kto"):
            rows["TRL"] = trl_run(job, args, work, files[{"dpo": "pref"}.get(job, job)], env)
        for r in rows.values():
            r["tokens_per_s"] = u["tokens"] / r["epoch_s"]
        print(job, json.dumps(rows), flush=True)
    peak = max(peak, gemm_peak(2048, args.precision))  # again after the children: the best
    meta = {"precision": args.precision, "batch": args.batch_size, "max_length": args.max_length,
            "join": args.join,
            "steps": spe, "cpu": cpu_name(), "cores": os.cpu_count(), "peak": peak,
            "params": PARAMS,
            "trl": trl.__version__, "unitune": unitune.__version__}  # fmt: skip
    # IFT against SFT, the schedules against sequential: unitune's own rows side by side
    if "ift" in results and "sft" in results:
        results["ift"] = {"ift": results["ift"]["unitune"], "sft": results["sft"]["unitune"]}
    joint = [j for j in ("mix", "alright", "maxright") if j in results]
    if joint and "sequential" in results:
        results["schedules"] = {"sequential": results.pop("sequential")["unitune"]} | {
            j: results.pop(j)["unitune"] for j in joint
        }
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"raw results: {work / 'results.json'}")
    return render(meta, results, args.update_readme)


def render(meta: dict, results: dict, write_readme: bool) -> int:
    text = table(results, meta)
    for job, rows in results.items():
        for fw, r in rows.items():
            if r.get("profile") and (fw == "unitune" or job == "dpo"):
                label = f"`unitune train`, {job}" + ("" if fw == "unitune" else f" ({fw})")
                text += "\n" + profile_table(label, r["profile"], meta["peak"], r["peak_rss_mb"])
    print("\n" + text)
    if write_readme:
        update_readme("train_vs_trl" + ("_bf16" if meta["precision"] == "bf16" else ""), text)
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="dpo,sft,kto,ift,schedules")
    p.add_argument("--examples", type=int, default=24, help="examples per epoch (2 run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--join", type=int, default=1, help="demo records per example (8: ~215-token sequences)"
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--allocator", action="store_true",
                   help="also DPO with UNITUNE_MALLOC=glibc and =default")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also DPO with train.compile: true")
    p.add_argument("--trim-mb", type=int, default=0,
                   help="also DPO with glibc's trim threshold at this many MiB")  # fmt: skip
    p.add_argument("--memory-options", action="store_true",
                   help="also DPO with gradient checkpointing, bf16 weights, LoRA")  # fmt: skip
    p.add_argument("--from-results", type=Path, help="render a saved results.json")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker, args)
        return
    if args.from_results:
        saved = json.loads(args.from_results.read_text())
        raise SystemExit(render(saved["meta"], saved["results"], args.update_readme))
    raise SystemExit(main_parent(args))


if __name__ == "__main__":
    main()
