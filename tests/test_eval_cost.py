"""An evaluation costs one forward per held-out sequence: the objectives' own held-out losses
reuse the metrics' log-probs (only IFT, with its own model pass, runs again), and give the values
a forward per batch gives."""

import pytest
from conftest import ANIMALS, write_jsonl
from run_parts import Parts, build

from unitune.config import parse_config
from unitune.data import length_batches

CASES = {  # objective whose own loss is not a metric, and its data
    "ipo": {"objectives": {"pref": {"name": "ipo"}}},
    "dpo-beta": {"objectives": {"pref": {"name": "dpo", "beta": 0.5}}},
    "kto": {"objectives": {"pref": {"name": "kto"}}, "unpaired": True},
}


def forwards_and_losses(raw: dict) -> tuple[Parts, int, dict]:
    run = build(parse_config(raw))
    calls = []
    run.policy.module.register_forward_hook(lambda *a: calls.append(1))
    out = run.evaluator.evaluate()
    return run, len(calls), out


def batches(n: int, bs: int) -> int:
    return len(length_batches([1] * n, bs, seed=0, shuffle=False))


@pytest.mark.parametrize("case", CASES)
def test_one_forward_per_held_out_sequence(case, tiny_config, tmp_path):
    raw = tiny_config("alright", eval_batch_size=2) | {
        k: v for k, v in CASES[case].items() if k != "unpaired"
    }
    if CASES[case].get("unpaired"):
        rows = [{"prompt": f"Describe a {a}.", "completion": f" A {a} is fine.",
                 "label": bool(i % 2)} for i, a in enumerate(ANIMALS * 2)]  # fmt: skip
        train, held = (
            write_jsonl(tmp_path / "u.jsonl", rows[:20]),
            write_jsonl(tmp_path / "ue.jsonl", rows[20:]),
        )
        raw["data"]["pref"] = {"train": str(train), "eval": str(held)}
    run, calls, out = forwards_and_losses(raw)
    sft, pref = run.session.data["sft"].eval, run.session.data["pref"].eval
    # eval_batch_size 2: one pass over each set of held-out sequences, nothing more
    passes = [len(sft)]
    if run.session.data["pref"].kind == "pairs":
        passes.append(2 * len(pref))  # chosen and rejected
    else:
        passes += [len(pref), len(pref)]  # the items, and KTO's mismatched pair of each
    assert calls == sum(batches(k, 2) for k in passes)
    key = run.session.cfg.own_loss_key("pref")
    # the value a forward per batch gives (the pre-reuse way)
    obj, params, split = run.session.objectives["pref"]
    want = sum(
        float(obj.loss(run.policy.objective_input("pref", "eval", idx), params)) * len(idx)
        for idx in run.session.eval_batches(split.eval)
    ) / len(split.eval)
    assert out[key] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("case", ["dpo-beta", "kto"])
def test_the_first_evaluation_reuses_the_references(case, tiny_config, tmp_path):
    """At step 0 the policy is the reference model: its held-out log-probs are the cached
    references (the same pass), so the start-of-run evaluation costs nothing and says the same."""
    raw = tiny_config("alright", eval_batch_size=2) | {
        k: v for k, v in CASES[case].items() if k != "unpaired"
    }
    if CASES[case].get("unpaired"):
        rows = [{"prompt": f"Describe a {a}.", "completion": f" A {a} is fine.",
                 "label": bool(i % 2)} for i, a in enumerate(ANIMALS * 2)]  # fmt: skip
        raw["data"]["pref"] = {
            "train": str(write_jsonl(tmp_path / "u.jsonl", rows[:20])),
            "eval": str(write_jsonl(tmp_path / "ue.jsonl", rows[20:])),
        }
    run, _, computed = forwards_and_losses(raw)
    calls = []
    run.policy.module.register_forward_hook(lambda *a: calls.append(1))
    reused = run.evaluator.evaluate(at_start=True)
    assert calls == []
    assert reused.keys() == computed.keys()
    for key, value in computed.items():
        assert reused[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert reused["reward_margin"] == 0.0  # exactly: policy and reference are one pass
