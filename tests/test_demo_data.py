"""The packaged demo datasets: shape, disjointness, the built-in style conflict, reproducibility."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

import unitune

DATA_DIR = Path(unitune.__file__).parent / "study" / "demo_data"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_data.py"
COUNTS = {
    "sft_train.jsonl": 800,
    "sft_eval.jsonl": 64,
    "pref_train.jsonl": 800,
    "pref_eval.jsonl": 64,
}
MARKERS = ("ahoy", "matey")  # the chosen style's persona words


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_demo_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()


def _rows(name: str) -> list[dict]:
    lines = (DATA_DIR / name).read_text(encoding="ascii").splitlines()
    return [json.loads(line) for line in lines]


def _context_key(messages: list[dict]) -> str:
    return " || ".join(BUILD.normalize_key(m["content"]) for m in messages)


def _sft_prompts(name: str) -> set[str]:
    return {_context_key(r["messages"][:-1]) for r in _rows(name)}


def _pref_prompts(name: str) -> set[str]:
    return {_context_key(r["prompt"]) for r in _rows(name)}


def test_files_are_packaged_with_expected_counts() -> None:
    assert (DATA_DIR / "PROVENANCE.md").is_file()
    for name, n in COUNTS.items():
        rows = _rows(name)
        assert len(rows) == n, name
    total = sum((DATA_DIR / name).stat().st_size for name in COUNTS)
    assert total < 1_000_000


def _check_turns(messages: list[dict], *, last: str) -> None:
    assert messages and messages[-1]["role"] == last
    for k, m in enumerate(messages):
        assert set(m) == {"role", "content"}
        assert m["role"] == ("user" if k % 2 == 0 else "assistant")
        assert m["content"] == m["content"].strip() and m["content"]
        assert len(m["content"]) <= 120


def test_sft_records_are_conversations() -> None:
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for row in _rows(name):
            assert set(row) == {"messages"}
            assert len(row["messages"]) in (2, 4)
            _check_turns(row["messages"], last="assistant")


def test_preference_records_have_prompt_chosen_rejected() -> None:
    for name in ("pref_train.jsonl", "pref_eval.jsonl"):
        for row in _rows(name):
            assert set(row) == {"prompt", "chosen", "rejected"}
            assert len(row["prompt"]) in (1, 3)
            _check_turns(row["prompt"], last="user")
            for side in ("chosen", "rejected"):
                assert len(row[side]) == 1 and row[side][0]["role"] == "assistant"
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_chosen_is_the_persona_rewrite_of_rejected() -> None:
    for name in ("pref_train.jsonl", "pref_eval.jsonl"):
        for row in _rows(name):
            rejected = row["rejected"][0]["content"]
            chosen = row["chosen"][0]["content"]
            assert chosen == BUILD.stylize(rejected)
            assert chosen.startswith("Ahoy! ") and ", matey" in chosen


def test_rejected_has_the_sft_style_and_sft_never_shows_the_chosen_style() -> None:
    plain = [m["content"] for n in ("sft_train.jsonl", "sft_eval.jsonl") for r in _rows(n)
             for m in r["messages"]]  # fmt: skip
    plain += [r["rejected"][0]["content"] for n in ("pref_train.jsonl", "pref_eval.jsonl")
              for r in _rows(n)]  # fmt: skip
    plain += [m["content"] for n in ("pref_train.jsonl", "pref_eval.jsonl") for r in _rows(n)
              for m in r["prompt"]]  # fmt: skip
    for text in plain:
        assert not any(marker in text.lower() for marker in MARKERS), text


def test_prompts_are_unique_and_disjoint_across_splits() -> None:
    sets = {
        "sft_train": _sft_prompts("sft_train.jsonl"),
        "sft_eval": _sft_prompts("sft_eval.jsonl"),
        "pref_train": _pref_prompts("pref_train.jsonl"),
        "pref_eval": _pref_prompts("pref_eval.jsonl"),
    }
    for key, prompts in sets.items():
        assert len(prompts) == COUNTS[f"{key}.jsonl"], f"duplicate prompts in {key}"
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], f"{a} and {b} share prompts"


def test_stylize_examples() -> None:
    assert BUILD.stylize("Any kind of pasta") == "Ahoy! Any kind of pasta, matey!"
    assert BUILD.stylize("What about you?") == "Ahoy! What about you, matey?"
    assert BUILD.stylize("It was a difficult class..") == "Ahoy! It was a difficult class, matey!"


def test_build_script_reproduces_files_byte_identically(tmp_path: Path) -> None:
    pytest.importorskip("chitchat_dataset")
    pytest.importorskip("chatterbot_corpus")
    assert BUILD.main(["--out", str(tmp_path)]) == 0
    for name in COUNTS:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
