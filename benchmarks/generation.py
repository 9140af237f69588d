"""Generation speed: Hugging Face `generate` against unitune's decode loop, side by side in one run.

    python benchmarks/generation.py [--batch 16] [--new-tokens 64] [--reps 3] [--update-readme]

SmolLM2-135M-Instruct (the embedded default), greedy, `--batch` chat prompts from the demo data,
left-padded, up to `--new-tokens` new tokens per row (a row that has ended gets padding until the
batch ends, as in HF `generate`; tokens per second count every row at every decoding step, and
every variant decodes the same number of steps when its tokens are HF's). Each variant runs in
its own child process of this one, one after the other (nothing else on the cores), warms up
once and is timed `--reps` times; the table gives the median new tokens per second, milliseconds
per decoding step and the ratio to HF `generate`'s default (the model as loaded, float32, a
dynamic KV cache):

- `hf generate`: `model.generate(...)`, the model in float32 (HF's default);
- `hf generate bf16`: the same on a bfloat16 copy of the model;
- `unitune fp32`: `unitune.models.decode.decode` on the model itself: its tokens are checked equal
  to HF's, token for token;
- `unitune fp32 packed` / `unitune bf16 packed`: decode on a `GenerationCopy` (weights packed for
  the CPU's GEMM kernels), what online rollouts use (bfloat16 when the run trains in bf16 mixed
  precision). The last column counts the rows whose tokens equal HF float32's.

- `vllm` / `vllm bf16` (`--device cuda`, with the `[vllm]` extra): unitune's vLLM engine
  (`models.vllm_generator`, what `online.generator: vllm` runs) on the same prompts, greedy.

On a GPU: `python benchmarks/generation.py --device cuda --variants "hf generate,hf generate
bf16,unitune fp32,vllm,vllm bf16"`. `--update-readme` writes the table between the
`<!-- bench:generation -->` markers of README.md (`generation_gpu` for `--device cuda`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_name, gpu_name, report, run_child, update_readme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["hf generate", "hf generate bf16", "unitune fp32", "unitune fp32 packed",
            "unitune bf16 packed"]  # fmt: skip


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    rows = []
    path = ROOT / "src/unitune/study/demo_data/pref_eval.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        prompt = record["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(rows) == batch:
            break
    while len(rows) < batch:
        rows.append(rows[len(rows) % len(rows)])
    return rows


def _vllm_run(batch: int, new_tokens: int, dtype: str):
    """The `vllm` variant's generation function: greedy, the engine started from the embedded
    default's cached checkpoint (the same weights as the model loaded by the others), rows
    padded after their EOS as HF's."""
    import torch

    from unitune.eval.generate import eos_ids
    from unitune.models.builtin import BUILTIN_SMOLLM2
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.models.lora import merged_weights
    from unitune.models.source import model_dir
    from unitune.models.vllm_generator import VllmGenerator, check_vllm

    why = check_vllm()
    if why is not None:
        sys.exit(why)
    model, tokenizer = load_model(ModelConfig(name=BUILTIN_SMOLLM2), probe=False)
    prompts, eos = _prompts(tokenizer, batch), eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    engine = VllmGenerator(model_dir(BUILTIN_SMOLLM2), dtype=getattr(torch, dtype), seed=0,
                           gpu_memory_utilization=0.5)  # fmt: skip
    engine.sync(merged_weights(model))  # as the online trainer does (the same weights here)
    del model

    def run():
        toks, _ = engine.generate(prompts, seeds=list(range(batch)), max_new_tokens=new_tokens,
                                  eos=eos, do_sample=False)  # fmt: skip
        width = max(len(t) for t in toks)
        return torch.tensor([t + [pad] * (width - len(t)) for t in toks])

    return run, pad


def child(variant: str, batch: int, new_tokens: int, reps: int, device: str = "cpu") -> None:
    import torch
    from transformers import GenerationConfig

    from unitune.eval.generate import eos_ids, left_pad
    from unitune.models.builtin import BUILTIN_SMOLLM2
    from unitune.models.config import ModelConfig
    from unitune.models.decode import decode
    from unitune.models.generation_copy import GenerationCopy
    from unitune.models.load import load_model

    if variant.startswith("vllm"):
        run, pad = _vllm_run(batch, new_tokens, "bfloat16" if "bf16" in variant else "float32")
        _time(variant, run, batch, reps, pad)
        return
    model, tokenizer = load_model(ModelConfig(name=BUILTIN_SMOLLM2), probe=False)
    model.eval().requires_grad_(False).to(device)
    ids, mask = left_pad(_prompts(tokenizer, batch), tokenizer.pad_token_id, torch.device(device))
    pad = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    if variant.startswith("hf"):
        if "bf16" in variant:
            model = model.to(torch.bfloat16)
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=pad, use_cache=True)  # fmt: skip

        def run():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[
                :, ids.shape[1] :
            ]
    else:
        if "packed" in variant:
            dtype = torch.bfloat16 if "bf16" in variant else torch.float32
            model = GenerationCopy(model, dtype).module

        def run():
            return decode(model, ids, mask, max_new_tokens=new_tokens, eos=eos, pad_id=pad).tokens

    _time(variant, run, batch, reps, pad)


def _time(variant: str, run, batch: int, reps: int, pad: int) -> None:
    import torch

    def timed():
        t0 = time.perf_counter()
        out = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    with torch.inference_mode():
        tokens, _ = timed()
        times = [timed()[1] for _ in range(reps)]
    s = statistics.median(times)
    steps = tokens.shape[1]
    rows = [_unpadded(r, pad) for r in tokens.tolist()]  # widths differ between engines
    report({"variant": variant, "seconds": s, "tokens": rows, "steps": steps,
            "tok_s": batch * steps / s, "ms_step": 1000 * s / steps})  # fmt: skip


def _unpadded(row: list[int], pad: int) -> list[int]:
    while row and row[-1] == pad:
        row = row[:-1]
    return row


def table(results: list[dict], batch: int, new_tokens: int, device: str = "cpu") -> str:
    base = results[0]
    where = cpu_name() if device == "cpu" else gpu_name()
    lines = [
        f"SmolLM2-135M-Instruct, greedy, batch {batch}, {new_tokens} new tokens per row, "
        f"on {where}:",
        "",
        "| generation | tokens/s | ms/step | vs HF | rows equal to HF fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"], strict=True))
        lines.append(
            f"| {r['variant']} | {r['tok_s']:.0f} | {r['ms_step']:.1f} | "
            f"{r['tok_s'] / base['tok_s']:.2f}x | {same}/{len(base['tokens'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (with the vllm variants)")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.batch, a.new_tokens, a.reps, a.device)
        return
    results = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--batch", str(a.batch),
               "--new-tokens", str(a.new_tokens), "--reps", str(a.reps),
               "--device", a.device]  # fmt: skip
        results.append(run_child(cmd, what=v))
        r = results[-1]
        print(f"{v:>22}: {r['tok_s']:7.0f} tokens/s  {r['ms_step']:6.1f} ms/step", flush=True)
    text = table(results, a.batch, a.new_tokens, a.device)
    print()
    print(text)
    if a.update_readme:
        update_readme("generation" if a.device == "cpu" else "generation_gpu", text)


if __name__ == "__main__":
    main()
