import json
from pathlib import Path

import pytest

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow", "yak", "elk", "ant", "emu", "bat", "pig"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_data(tmp_path) -> dict[str, Path]:
    """Small SFT (messages) and preference (conversational) datasets, train and eval."""

    def sft(animals):
        return [
            {
                "messages": [
                    {"role": "user", "content": f"What does a {a} say?"},
                    {"role": "assistant", "content": f"The {a} says hello to you."},
                ]
            }
            for a in animals
        ]

    def pref(animals):
        return [
            {
                "prompt": [{"role": "user", "content": f"Describe a {a}."}],
                "chosen": [{"role": "assistant", "content": f"A {a} is a WONDERFUL animal!"}],
                "rejected": [{"role": "assistant", "content": f"A {a} is an animal."}],
            }
            for a in animals
        ]

    return {
        "sft_train": write_jsonl(tmp_path / "sft_train.jsonl", sft(ANIMALS * 2)),
        "sft_eval": write_jsonl(tmp_path / "sft_eval.jsonl", sft(["hen", "ram", "gnu"])),
        "pref_train": write_jsonl(tmp_path / "pref_train.jsonl", pref(ANIMALS * 2)),
        "pref_eval": write_jsonl(tmp_path / "pref_eval.jsonl", pref(["hen", "ram", "gnu"])),
    }


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A config dict for builtin:tiny on `tiny_data`, with a private cache dir."""

    def make(schedule: str = "alright", **train) -> dict:
        return {
            "name": schedule,
            "model": {"name": "builtin:tiny"},
            "data": {
                "sft": {"train": str(tiny_data["sft_train"]), "eval": str(tiny_data["sft_eval"])},
                "pref": {
                    "train": str(tiny_data["pref_train"]),
                    "eval": str(tiny_data["pref_eval"]),
                },
                "max_length": 64,
            },
            "schedule": {"name": schedule, "lam": 0.5, "k": 2},
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
