import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# DeepSpeed's CPU op, compiled once into the venv by `make setup` (as `make test` sets it)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow", "yak", "elk", "ant", "emu", "bat", "pig"]


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama with untied embeddings, for log-prob level tests."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def padded_batch(vocab: int, rows: int, width: int, short_to: int, target_from: int) -> dict:
    """Random ids, the last row right-padded from `short_to`, targets from `target_from`: the
    `input_ids` / `attention_mask` / `target_mask` a training pass takes."""
    ids = torch.randint(3, vocab, (rows, width))
    mask = torch.ones_like(ids)
    mask[-1, short_to:] = 0
    target = torch.zeros_like(ids)
    target[:, target_from:] = 1
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def perturbed_tiny():
    """builtin:tiny with its weights perturbed (seeded): the plain one greedily writes only
    newlines, this one varied tokens (generation tests)."""
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model

    model, tok = load_model(ModelConfig(name="builtin:tiny"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw str/bytes lines written as they are."""
    with open(path, "wb") as fh:
        for row in rows:
            if isinstance(row, bytes):
                fh.write(row + b"\n")
            elif isinstance(row, str):
                fh.write(row.encode() + b"\n")
            else:
                fh.write(json.dumps(row).encode() + b"\n")
    return path


TIMING = (
    "elapsed_s",
    "tokens_per_s",
    "step_s",
    "eval_s",
)  # wall-clock fields: the only ones a rerun may change


def run_records(run_dir: Path) -> list[dict]:
    """A run directory's metrics.jsonl lines without their wall-clock fields."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def cut_run(full: Path, cut: Path, step: int) -> None:
    """`full`'s run directory copied to `cut` as a run killed after checkpoint `step`: its
    later checkpoints, final model and summary gone (resume it with `resume=True`)."""
    import shutil

    from unitune.training import checkpoint

    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("model", "summary.json"))
    for ckpt in checkpoint.list_checkpoints(cut):
        if checkpoint.step_of(ckpt) > step:
            shutil.rmtree(ckpt)


def final_weights(run_dir: Path) -> dict:
    """The tensors of a run directory's saved model (or LoRA adapter)."""
    from safetensors.torch import load_file

    full = run_dir / "model" / "model.safetensors"
    return load_file(full if full.exists() else run_dir / "model" / "adapter_model.safetensors")


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def target_spans(tok, seq) -> list[str]:
    """The decoded runs of consecutive target tokens of a `Sequence`."""
    spans, run = [], []
    for token, m in zip(seq.input_ids, seq.target_mask, strict=True):
        if m:
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


def sft_records(animals: list[str]) -> list[dict]:
    """SFT records (messages), one per animal."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What does a {a} say?"},
                {"role": "assistant", "content": f"The {a} says hello to you."},
            ]
        }
        for a in animals
    ]


def pref_records(animals: list[str]) -> list[dict]:
    """Preference pairs (conversational), one per animal."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Describe a {a}."}],
            "chosen": [{"role": "assistant", "content": f"A {a} is a WONDERFUL animal!"}],
            "rejected": [{"role": "assistant", "content": f"A {a} is an animal."}],
        }
        for a in animals
    ]


@pytest.fixture
def tiny_data(tmp_path) -> dict[str, Path]:
    """Small SFT (messages) and preference (conversational) datasets, train and eval."""
    sft, pref = sft_records, pref_records
    return {
        "sft_train": write_jsonl(tmp_path / "sft_train.jsonl", sft(ANIMALS * 2)),
        "sft_eval": write_jsonl(tmp_path / "sft_eval.jsonl", sft(["hen", "ram", "gnu"])),
        "pref_train": write_jsonl(tmp_path / "pref_train.jsonl", pref(ANIMALS * 2)),
        "pref_eval": write_jsonl(tmp_path / "pref_eval.jsonl", pref(["hen", "ram", "gnu"])),
    }


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A config dict for builtin:tiny on `tiny_data`, with a private cache dir; "parallel" is
    the parallel job (PAFT), the other names schedules."""

    def make(schedule: str = "alright", **train) -> dict:
        job = "parallel" if schedule == "parallel" else "train"
        return {
            "name": schedule,
            **({"job": job} if job == "parallel" else {}),
            "model": {"name": "builtin:tiny"},
            "data": {
                "sft": {"train": str(tiny_data["sft_train"]), "eval": str(tiny_data["sft_eval"])},
                "pref": {
                    "train": str(tiny_data["pref_train"]),
                    "eval": str(tiny_data["pref_eval"]),
                },
                "max_length": 64,
            },
            "schedule": {
                **({"name": schedule} if job == "train" else {}),
                "lam": 0.5,
                **({"k": 2} if schedule == "maxright" else {}),
            },
            "train": {
                "max_steps": 4,
                "batch_size": 4,
                "lr": 1e-3,
                "eval_every": 2,
                "eval_batch_size": 8,
                "seed": 0,
                **train,
            },
            "output_dir": str(tmp_path / "runs" / schedule),
            "cache_dir": str(tmp_path / "cache"),
        }

    return make
