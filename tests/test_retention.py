"""Benchmark retention through lm-evaluation-harness on builtin:tiny in memory, with the shipped
offline task `unitune_mc`: its data, its accuracy against a hand computation, the RNG and model
mode left alone, and the one-line errors."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unitune.eval.retention import TASKS_DIR, RetentionError, run_retention
from unitune.models.config import ModelConfig
from unitune.models.load import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name="builtin:tiny"))


def test_the_shipped_task_data_reproduces_from_its_script():
    spec = importlib.util.spec_from_file_location("build_mc", ROOT / "scripts/build_unitune_mc.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rows = build.build()
    text = (TASKS_DIR / "unitune_mc.jsonl").read_text()
    assert text == "".join(json.dumps(r) + "\n" for r in rows)
    assert len(rows) == 80
    for r in rows:
        assert len(r["choices"]) == len(set(r["choices"])) == 4
        assert 0 <= r["answer"] < 4
    assert (TASKS_DIR / "unitune_mc.yaml").is_file()


def hand_accuracy(model, tok, docs) -> float:
    """lm-eval's multiple-choice accuracy computed by hand: the choice with the largest summed
    log-prob of " " + choice after "Question: ...\\nAnswer:"."""
    right = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        right += int(max(range(4), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


def test_retention_on_a_model_in_memory(tiny):
    model, tok = tiny
    model.train()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    out = run_retention(model, tok, ["unitune_mc"], limit=12, batch_size=4)
    assert set(out) == {"unitune_mc"}
    metrics = out["unitune_mc"]
    assert {"acc", "acc_norm"} <= set(metrics)
    docs = [json.loads(x) for x in (TASKS_DIR / "unitune_mc.jsonl").read_text().splitlines()][:12]
    assert metrics["acc"] == pytest.approx(hand_accuracy(model, tok, docs))
    assert model.training
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    assert run_retention(model, tok, []) == {}


def test_retention_errors_are_one_line(tiny, monkeypatch):
    model, tok = tiny
    with pytest.raises(RetentionError, match="lm-eval: ") as err:
        run_retention(model, tok, ["unitune_no_such_task"], limit=1)
    assert "\n" not in str(err.value) and "unitune_no_such_task" in str(err.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(RetentionError, match=r'pip install "unitune\[eval\]"'):
        run_retention(model, tok, ["unitune_mc"])
