"""Online training, unitune against TRL 1.16 on the path users run: `unitune train` beside TRL's
`GRPOTrainer` and `OnlineDPOTrainer`, each in its own child process of this one.

    python benchmarks/online_vs_trl.py [--jobs grpo,online_dpo] [--steps 6] [--precision fp32]
                                       [--update-readme]

Both train SmolLM2-135M-Instruct (the embedded default, full fine-tuning) on the demo pairs'
prompts, scored by the same Python reward function (`benchmarks/online_reward.py:pirate`), with
the same number of generations per prompt, `max_new_tokens`, temperature 1, no top-k / top-p,
precision, batch and learning rate (AdamW, lr 1e-6, clipping 1.0), one optimizer step per
generation batch:

- grpo: 2 prompts x 4 generations = 8 completions per step, beta 0, loss `dapo` (TRL's
  defaults), 48 new tokens at most;
- online_dpo: 4 prompts x 2 generations = 8 completions per step, beta 0.1, the reference model
  run every step (TRL's default), 48 new tokens at most. TRL's `OnlineDPOConfig` turns gradient
  checkpointing on by default, and with it generates without a KV cache; a second TRL row has it
  off (`gradient_checkpointing=False`).

The first step is a warm-up; the table gives the mean of the others: seconds per step, the
share of it spent generating, tokens decoded per second of generation (rows x decoding steps:
a batch decodes until its longest completion ends, so this is the engine's rate whatever the
completions' lengths), peak RSS (`wait4`), and the ratios. unitune's step and
generation times are its own `metrics.jsonl` (`step_s`, `time/generate_s`); TRL's come from a
`TrainerCallback` and from timing `generate` (the time its trainers spend in it). unitune runs
on the allocator its CLI picks (tcmalloc where installed, else glibc tuned); TRL on glibc with
unitune's settings (`unitune.core.allocator.tune()`: faster than TRL's own default).

`--bf16-rollouts` (with fp32) adds unitune with `online.generation_dtype: bfloat16`: training in
float32, rollouts from the packed bfloat16 copy (a CPU with fast bf16).

`--vllm` (a CUDA GPU with the `[vllm]` extra) adds both on vLLM colocated with training:
unitune's `online.generator: vllm` and TRL's `use_vllm=True, vllm_mode="colocate"`, each taking
0.3 of the GPU's memory; on a GPU both train on it.

`--update-readme` writes the table between the `<!-- bench:online_vs_trl -->` markers of
README.md (`online_vs_trl_bf16` for `--precision bf16`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_name, gpu_name, run_measured, update_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "unitune" / "study" / "demo_data"
REWARD = Path(__file__).resolve().parent / "online_reward.py"
JOBS = {  # job: (generations per prompt, prompts per step)
    "grpo": (4, 2),
    "online_dpo": (2, 4),
}
NEW_TOKENS = 48


def prompts_file(work: Path, n: int) -> Path:
    """The first `n` prompts of the demo pairs (prompt only: what both trainers read)."""
    out = work / "prompts.jsonl"
    with open(DEMO / "pref_train.jsonl") as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            if i == n:
                break
            dst.write(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n")
    return out


# ------------------------------------------------------------------------------ unitune
def unitune_run(
    job: str, args, work: Path, data: Path, env: dict, online: dict | None = None, tag: str = ""
) -> dict:
    import yaml

    g, prompts = JOBS[job]
    params = {"grpo": {"beta": 0.0, "loss_type": "dapo"}, "online_dpo": {"beta": 0.1}}[job]
    cfg = {
        "name": f"bench-{job}",
        "model": {"name": "builtin:smollm2-135m", "dtype": "float32"},
        "data": {"pref": {"train": str(data)}, "max_length": 512},
        "objectives": {"pref": {"name": job, **params}},
        "schedule": {"name": "pref"},
        "online": {
            "rewards": [f"{REWARD}:pirate"],
            "num_generations": g,
            "temperature": 1.0,
            "max_new_tokens": NEW_TOKENS,
            "steps_per_generation": 1,
            "num_iterations": 1,
            "log_completions": 0,
            **(online or {}),
        },  # fmt: skip
        "train": {
            "max_steps": args.steps,
            "batch_size": g * prompts,
            "lr": 1e-6,
            "max_grad_norm": 1.0,
            "eval_every": 10**6,
            "save_model": False,
            "save_every": 10**6,
            "seed": 0,
            "mixed_precision": "bf16" if args.precision == "bf16" else "no",
        },  # fmt: skip
        "output_dir": str(work / f"unitune-{job}{tag}"),
        "cache_dir": str(work / "cache"),
    }
    path = work / f"{job}{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "unitune.cli", "train", str(path), "--no-progress"]
    _, rss = run_measured(cmd, env, f"unitune {job}")
    rows = [json.loads(x) for x in (work / f"unitune-{job}{tag}" / "metrics.jsonl").open()]
    steps = {r["step"]: r for r in rows if r["type"] == "train"}
    timed = [steps[s] for s in sorted(steps) if s > 1]
    step_s = [r["step_s"] for r in timed]
    gen_s = [r["time/generate_s"] for r in timed]
    tokens = [r["completions/max_length"] * g * prompts for r in timed]  # rows x decoding steps
    gap = [r.get("sampling/sampling_logp_difference/mean", 0.0) for r in timed]
    return {"step_s": sum(step_s) / len(step_s), "generate_s": sum(gen_s) / len(gen_s),
            "gen_tokens_per_s": sum(tokens) / sum(gen_s), "peak_rss_mb": rss,
            "logp_gap": sum(gap) / len(gap)}  # fmt: skip


# ---------------------------------------------------------------------------------- TRL
def trl_worker(job: str, args) -> None:
    """Child: TRL's trainer for `job`; prints one RESULT line."""
    import importlib.util

    import torch
    import transformers
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from unitune.core.allocator import tune
    from unitune.models.builtin import smollm2_cache_dir

    tune()  # glibc as unitune tunes it where tcmalloc is not installed
    torch.manual_seed(0)
    spec = importlib.util.spec_from_file_location("online_reward", REWARD)
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    path = smollm2_cache_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    data = load_dataset("json", data_files=str(args.data_file), split="train")
    g, prompts = JOBS[job]
    steps, gen, start = [], {"s": 0.0, "tokens": 0}, {}
    generate = transformers.GenerationMixin.generate

    def timed_generate(self, *a, **kw):  # the time TRL's trainer spends in `generate`
        t = time.perf_counter()
        out = generate(self, *a, **kw)
        gen["s"] += time.perf_counter() - t
        ids = out if torch.is_tensor(out) else out.sequences
        width = (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]
        gen["tokens"] += ids.shape[0] * (ids.shape[1] - width)  # rows x decoding steps
        return out

    transformers.GenerationMixin.generate = timed_generate
    if args.trl_vllm:  # TRL's vLLM path: the time in its `VLLMGeneration.generate`
        from trl.generation.vllm_generation import VLLMGeneration

        vllm_generate = VLLMGeneration.generate

        def timed_vllm(self, *a, **kw):
            t = time.perf_counter()
            out = vllm_generate(self, *a, **kw)
            gen["s"] += time.perf_counter() - t
            gen["tokens"] += sum(len(c) for c in out[1])  # tokens decoded
            return out

        VLLMGeneration.generate = timed_vllm

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            start["t"] = time.perf_counter()
            start["gen"], start["tokens"] = gen["s"], gen["tokens"]

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > 1:
                steps.append((time.perf_counter() - start["t"], gen["s"] - start["gen"],
                              gen["tokens"] - start["tokens"]))  # fmt: skip

    common = dict(
        output_dir=str(Path(args.work) / f"trl-{job}"), max_steps=args.steps, learning_rate=1e-6,
        max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=10**6,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
        seed=0, bf16=args.precision == "bf16", temperature=1.0,
    )  # fmt: skip
    if args.trl_vllm:
        common |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    if job == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(per_device_train_batch_size=g * prompts, num_generations=g,
                         max_completion_length=NEW_TOKENS, beta=0.0, loss_type="dapo",
                         **common)  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=[reward.pirate], args=cfg,
                              train_dataset=data, processing_class=tok,
                              callbacks=[Timer()])  # fmt: skip
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        extra = {"gradient_checkpointing": False} if args.trl_no_checkpointing else {}
        cfg = OnlineDPOConfig(per_device_train_batch_size=prompts, max_new_tokens=NEW_TOKENS,
                              beta=0.1, **extra, **common)  # fmt: skip
        trainer = OnlineDPOTrainer(model=model, reward_funcs=[reward.pirate], args=cfg,
                                   train_dataset=data, processing_class=tok,
                                   callbacks=[Timer()])  # fmt: skip
    trainer.train()
    n = len(steps)
    print("RESULT " + json.dumps({
        "step_s": sum(s for s, _, _ in steps) / n, "generate_s": sum(x for _, x, _ in steps) / n,
        "gen_tokens_per_s": sum(t for _, _, t in steps) / max(sum(x for _, x, _ in steps), 1e-9),
    }), flush=True)  # fmt: skip


def trl_run(
    job: str, args, work: Path, data: Path, env: dict, checkpointing: bool = True,
    vllm: bool = False,
) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--trl-worker", job, "--data-file", str(data),
           "--work", str(work), "--steps", str(args.steps),
           "--precision", args.precision]  # fmt: skip
    if not checkpointing:
        cmd.append("--trl-no-checkpointing")
    if vllm:
        cmd.append("--trl-vllm")
    out, rss = run_measured(cmd, env, f"TRL {job}")
    result = json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])
    return {**result, "peak_rss_mb": rss}


# ----------------------------------------------------------------------------------- main
def table(results: dict, meta: dict) -> str:
    head = ("| job | framework | s/step | generating | decoded tokens/s | peak RSS | vs TRL |\n"
            "|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for job, rows in results.items():
        base = rows["TRL 1.16"]
        for fw, r in rows.items():
            ratio = "" if r is base else (
                f"{base['step_s'] / r['step_s']:.2f}x faster, "
                f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x memory"
            )  # fmt: skip
            lines.append(
                f"| {job} | {fw} | {r['step_s']:.2f} | {r['generate_s'] / r['step_s']:.0%} | "
                f"{r['gen_tokens_per_s']:.0f} | {r['peak_rss_mb'] / 1024:.2f} GB | {ratio} |"
            )
    return (
        f"SmolLM2-135M-Instruct, {meta['precision']}, 8 completions per step (grpo: 2 prompts x 4, "
        f"online_dpo: 4 prompts x 2), at most {NEW_TOKENS} new tokens, {meta['steps']} steps "
        f"(the first not timed); {meta['cpu']}, {meta['cores']} cores; TRL {meta['trl']}, "
        f"unitune {meta['unitune']}.\n\n" + head + "\n".join(lines) + "\n"
    )


def gpu() -> str:
    """The GPU unitune trains on, as ", with NAME", or nothing without CUDA."""
    import torch

    return f", with {gpu_name()}" if torch.cuda.is_available() else ""


def main_parent(args) -> int:
    import trl

    import unitune

    work = Path(tempfile.mkdtemp(prefix="unitune-online-bench-"))
    data = prompts_file(work, 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    results: dict[str, dict] = {}
    for job in args.jobs.split(","):
        rows = results.setdefault(job, {})
        rows["TRL 1.16"] = trl_run(job, args, work, data, env)
        print(job, "TRL", json.dumps(rows["TRL 1.16"]), flush=True)
        if job == "online_dpo":
            off = trl_run(job, args, work, data, env, checkpointing=False)
            rows["TRL 1.16, no grad. ckpt"] = off
            print(job, "TRL without gradient checkpointing", json.dumps(off), flush=True)
        rows["unitune"] = unitune_run(job, args, work, data, env)
        print(job, "unitune", json.dumps(rows["unitune"]), flush=True)
        if args.vllm:  # a GPU with the [vllm] extra: both frameworks on vLLM, colocated
            rows["TRL 1.16, vllm"] = trl_run(job, args, work, data, env, vllm=True)
            print(job, "TRL, vllm", json.dumps(rows["TRL 1.16, vllm"]), flush=True)
            v = unitune_run(job, args, work, data, env, {"generator": "vllm"}, "-vllm")
            rows["unitune, vllm"] = v
            print(job, "unitune, vllm", json.dumps(v), flush=True)
        if args.precision == "fp32" and args.bf16_rollouts:
            b = unitune_run(job, args, work, data, env, {"generation_dtype": "bfloat16"}, "-b")
            rows["unitune, bf16 rollouts"] = b
            print(job, "unitune, bf16 rollouts", json.dumps(b), flush=True)
    meta = {"precision": args.precision, "steps": args.steps, "cpu": cpu_name() + gpu(),
            "cores": os.cpu_count(), "trl": trl.__version__,
            "unitune": unitune.__version__}  # fmt: skip
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"raw results: {work / 'results.json'}")
    return render(meta, results, args.update_readme)


def render(meta: dict, results: dict, write_readme: bool) -> int:
    text = table(results, meta)
    print("\n" + text)
    if write_readme:
        bf16 = meta["precision"] != "fp32"
        update_readme("online_vs_trl" + (f"_{meta['precision']}" if bf16 else ""), text)
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="grpo,online_dpo")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--bf16-rollouts", action="store_true",
                   help="fp32: also unitune with online.generation_dtype: bfloat16")  # fmt: skip
    p.add_argument("--from-results", type=Path, help="render a saved results.json")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--trl-no-checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trl-vllm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vllm", action="store_true",
                   help="also both on vLLM, colocated (CUDA, the [vllm] extra)")  # fmt: skip
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
