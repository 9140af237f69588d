"""Loading preference data at scale: unitune's loader beside TRL's `datasets.map` tokenization.

    python benchmarks/data_scale.py [--sizes 20000,200000,1000000] [--num-proc 2]
                                    [--workdir DIR] [--update-readme]

Synthetic conversational preference pairs (`{"prompt": [user], "chosen": [assistant],
"rejected": [assistant]}`, seeded, from a fixed word list) are written as JSONL, one file per
size. For each size, each measured thing runs in its own child process, one after the other:

- unitune, cold: `unitune.data.load_preference(path, SmolLM2's tokenizer, max_length=512,
  num_proc=P, cache_dir=<empty>)`: read, validate, render the chat template, tokenize, write the
  tokenized-data cache. The loader `unitune train` calls (`batches.load_data`).
- unitune, warm: the same call again: the cache entry is found and memory-mapped.
- TRL, cold: `datasets.load_dataset("json", ...)` then TRL 1.16's own `DPOTrainer._prepare_dataset`
  (prompt extraction check, chat template, `datasets.map` tokenization with
  `dataset_num_proc=P`), with an empty `HF_DATASETS_CACHE`.
- TRL, warm: the same again: `datasets` finds its own cached Arrow files by fingerprint.

Each child reports its wall time and, from `/proc/self/status`, its resident memory after the
imports and the tokenizer (`base`) and its peak (`VmHWM`); "growth" is peak minus base, set
beside the size of the token arrays unitune keeps (`TokenStore.nbytes`). Worker processes
(`num_proc > 1`) are not counted in either framework's figure. `--update-readme` writes the table
between the `<!-- bench:data_scale -->` markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu_name, report, run_child

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- bench:data_scale -->", "<!-- /bench:data_scale -->"
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no what can out up about into more some time model answer question data train"
).split()


def write_pairs(n: int, path: Path) -> Path:
    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w") as fh:
        for i in range(n):
            row = {
                "prompt": [{"role": "user", "content": text(5, 30)}],
                "chosen": [{"role": "assistant", "content": text(5, 50)}],
                "rejected": [{"role": "assistant", "content": text(5, 50)}],
                "id": i,
            }
            fh.write(json.dumps(row) + "\n")
    return path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    from transformers import AutoTokenizer

    from unitune.models.builtin import smollm2_cache_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_cache_dir()))
    if args.tool == "trl":
        import types

        import datasets
        from trl import DPOConfig, DPOTrainer

        datasets.disable_progress_bars()
        conf = DPOConfig(
            output_dir=tempfile.mkdtemp(), max_length=512, use_cpu=True, bf16=False,
            dataset_num_proc=args.num_proc if args.num_proc > 1 else None,
        )  # fmt: skip
        base = _status_mib("VmRSS")
        t = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=args.data, split="train")
        ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), ds, tok, conf, "x")
        seconds, n, arrays = time.perf_counter() - t, len(ds), None
    else:
        from unitune.data import load_preference

        base = _status_mib("VmRSS")
        t = time.perf_counter()
        items, _ = load_preference(
            args.data, tok, max_length=512, num_proc=args.num_proc, cache_dir=args.cache
        )
        seconds, n, arrays = time.perf_counter() - t, len(items), items.store.nbytes / 2**20
    report(
        {
            "seconds": seconds,
            "items": n,
            "base_mib": base,
            "peak_mib": _status_mib("VmHWM"),
            "arrays_mib": arrays,
        }  # fmt: skip
    )


def measure(tool: str, data: Path, num_proc: int, cache: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--data", str(data)]
    cmd += ["--num-proc", str(num_proc), "--cache", str(cache)]
    return run_child(cmd, env=env, what=f"{tool} on {data.name}")


def growth(x: dict) -> float:
    """Resident memory the load added: peak minus the process's size before it."""
    return x["peak_mib"] - x["base_mib"]


def table(results: dict, meta: dict) -> str:
    lines = [
        f"Loading conversational preference pairs (SmolLM2 tokenizer, max_length 512, "
        f"`num_proc` {meta['num_proc']} for both), {meta['cpu']}, {meta['cores']} cores, "
        f"`python benchmarks/data_scale.py`:",
        "",
        "| pairs | tokens | TRL `datasets.map` cold | unitune cold | × | unitune warm | × TRL cold "
        "| TRL warm | memory growth TRL / unitune | unitune token arrays |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        trl_c, uni_c, uni_w, trl_w = (
            r["trl_cold"],
            r["unitune_cold"],
            r["unitune_warm"],
            r["trl_warm"],
        )

        def growth(x: dict) -> float:
            return x["peak_mib"] - x["base_mib"]

        lines.append(
            f"| {int(size):,} | {r['tokens'] / 1e6:.1f} M | {trl_c['seconds']:.1f} s "
            f"| {uni_c['seconds']:.1f} s | {trl_c['seconds'] / uni_c['seconds']:.1f}× "
            f"| {uni_w['seconds']:.2f} s | {trl_c['seconds'] / uni_w['seconds']:.0f}× "
            f"| {trl_w['seconds']:.2f} s | {growth(trl_c):.0f} / {growth(uni_c):.0f} MiB "
            f"| {uni_c['arrays_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000,1000000")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--from-results", type=Path, default=None)
    ap.add_argument("--child", choices=["unitune", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.tool = args.child
        return child(args)
    if args.from_results:
        saved = json.loads(args.from_results.read_text())
        return render(saved["meta"], saved["results"], args.update_readme)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="unitune-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "num_proc": args.num_proc}
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        data = write_pairs(size, work / f"pairs-{size}.jsonl")
        uni_cache, hf_cache = work / f"unitune-cache-{size}", work / f"hf-cache-{size}"
        for d in (uni_cache, hf_cache):
            shutil.rmtree(d, ignore_errors=True)
        env = dict(os.environ, HF_DATASETS_CACHE=str(hf_cache), TOKENIZERS_PARALLELISM="true")
        r = {}
        for name, tool in (("trl_cold", "trl"), ("trl_warm", "trl")):
            r[name] = measure(tool, data, args.num_proc, uni_cache, env)
            print(f"{size} {name}: {r[name]}", flush=True)
        for name in ("unitune_cold", "unitune_warm"):
            r[name] = measure("unitune", data, args.num_proc, uni_cache, env)
            print(f"{size} {name}: {r[name]}", flush=True)
        meta_path = next((uni_cache / "data").iterdir()) / "meta.json"
        r["tokens"] = json.loads(meta_path.read_text())["lengths"]["ids.i32"]
        results[str(size)] = r
        (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}))
        for d in (uni_cache, hf_cache):
            shutil.rmtree(d, ignore_errors=True)
        data.unlink()
    print(f"results: {work / 'results.json'}")
    return render(meta, results, args.update_readme)


def render(meta: dict, results: dict, update_readme: bool) -> None:
    text = table(results, meta)
    print(text)
    if update_readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        start, end = body.index(MARK_START) + len(MARK_START), body.index(MARK_END)
        readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])


if __name__ == "__main__":
    main()
