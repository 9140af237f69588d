"""Every objective inside the joint schedules, on builtin:tiny."""

import json
import math
from pathlib import Path

import pytest
from conftest import ANIMALS, write_jsonl

from unitune.config import parse_config
from unitune.jobs import train
from unitune.objectives import REGISTRY
from unitune.training.reference_set import References
from unitune.training.session import Session

SFT_FAMILY = [n for n, o in REGISTRY.items() if o.data == "demonstrations" and n != "sft"]
PAIR_FAMILY = [n for n, o in REGISTRY.items() if o.data == "pairs" and n != "dpo"]
UNPAIRED = [n for n, o in REGISTRY.items() if o.data == "unpaired"]


@pytest.fixture
def feedback_files(tmp_path):
    def rows(animals, kind):
        out = []
        for i, a in enumerate(animals):
            good = i % 2 == 0
            row = {
                "prompt": [{"role": "user", "content": f"Describe a {a}."}],
                "completion": [
                    {"role": "assistant", "content": f"A {a} is {'WONDERFUL' if good else 'dull'}."}
                ],
            }
            row |= {"label": good} if kind == "label" else {"score": 9.0 if good else 2.0}
            out.append(row)
        return out

    held_out = ["hen", "ram", "gnu", "doe"]
    return {
        kind: (write_jsonl(tmp_path / f"{kind}_train.jsonl", rows(ANIMALS * 2, kind)),
               write_jsonl(tmp_path / f"{kind}_eval.jsonl", rows(held_out, kind)))
        for kind in ("label", "score")
    }  # fmt: skip


def run(raw) -> tuple[dict, list[dict]]:
    cfg = parse_config(raw)
    summary = train(cfg, progress=False)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").open()]
    return summary, [r for r in rows if r["type"] == "eval"]


@pytest.mark.parametrize("schedule", ["alright", "mix"])
@pytest.mark.parametrize("name", SFT_FAMILY)
def test_sft_family_in_schedules(tiny_config, schedule, name):
    raw = tiny_config(schedule, max_steps=3, eval_every=3)
    raw["objectives"] = {"sft": {"name": name}, "pref": {"name": "dpo"}}
    summary, evals = run(raw)
    assert summary["sft_objective"] == name
    assert math.isfinite(evals[-1][f"loss_{name}"]) and math.isfinite(evals[-1]["deviation"])


@pytest.mark.parametrize("schedule", ["alright", "mix"])
@pytest.mark.parametrize("name", PAIR_FAMILY)
def test_pair_family_in_schedules(tiny_config, schedule, name):
    raw = tiny_config(schedule, max_steps=3, eval_every=3)
    raw["objectives"] = {"sft": {"name": "sft"}, "pref": {"name": name}}
    summary, evals = run(raw)
    assert math.isfinite(evals[-1]["f_pref"])
    # una_pair at eval.beta is DPO at eval.beta: its own loss is f_pref, not reported twice
    if name == "una_pair":
        assert "loss_una_pair" not in evals[-1]
        assert evals[-1]["f_pref"] == pytest.approx(math.log(2), abs=0.2)
    else:
        assert math.isfinite(evals[-1][f"loss_{name}"])


@pytest.mark.parametrize("schedule", ["alright", "mix"])
@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_family_in_schedules(tiny_config, feedback_files, schedule, name):
    raw = tiny_config(schedule, max_steps=3, eval_every=3)
    kind = "score" if name == "una_score" else "label"
    train_file, eval_file = feedback_files[kind]
    raw["data"]["pref"] = {"train": str(train_file), "eval": str(eval_file)}
    if kind == "score":
        raw["data"]["pref"]["score_range"] = [0, 10]
    raw["objectives"] = {"sft": {"name": "uft" if name.startswith("una") else "sft"},
                         "pref": {"name": name}}  # fmt: skip
    summary, evals = run(raw)
    last = evals[-1]
    # f_pref is the unpaired logistic loss at eval.beta whatever the objective: log 2 at the start
    assert evals[0]["f_pref"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(last["f_pref"]) and math.isfinite(last[f"loss_{name}"])
    assert 0.0 <= last["reward_acc"] <= 1.0
    if name == "kto":
        trains = [json.loads(x) for x in (Path(raw["output_dir"]) / "metrics.jsonl").open()]
        kls = [r["kl"] for r in trains if r.get("objective") == "pref" and "kl" in r]
        assert kls and all(math.isfinite(k) and k >= 0 for k in kls)


def test_kto_trains_on_pair_data_by_unpairing(tiny_config):
    raw = tiny_config("alright", max_steps=2, eval_every=2)
    raw["objectives"] = {"pref": {"name": "kto"}}
    cfg = parse_config(raw)
    split = Session(cfg).data["pref"]
    assert split.kind == "unpaired" and len(split.train) == 2 * 24  # every pair, both sides
    assert sorted({f.target for f in split.train}) == [0.0, 1.0]


def test_pair_objective_refuses_unpaired_data(tiny_config, feedback_files):
    from unitune.data import DataError

    raw = tiny_config("alright", max_steps=2)
    raw["data"]["pref"] = {"train": str(feedback_files["label"][0])}
    with pytest.raises(DataError, match="needs preference pairs"):
        train(parse_config(raw), progress=False)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_objectives_compute_no_training_reference(tiny_config, monkeypatch, name):
    import unitune.training.reference_set as trainer

    computed = []
    original = trainer.reference_logps

    def spy(policy, seqs, **kw):
        computed.append(len(seqs))
        return original(policy, seqs, **kw)

    monkeypatch.setattr(trainer, "reference_logps", spy)
    raw = tiny_config("alright", max_steps=2)
    raw["objectives"] = {"pref": {"name": name}}
    refs = References(Session(parse_config(raw)))
    assert ("pref", "train", "main") not in refs and ("sft", "train", "main") not in refs
    # only the held-out sets, for the metrics against the starting model (3 + 2*3 sequences)
    assert sorted(computed) == [3, 6]


def test_kto_held_out_kl_is_zero_at_the_start_across_eval_batches(tiny_config, feedback_files):
    """At pi_theta = pi_ref the KL estimate is 0: the held-out mismatched pairs scored by the
    policy must be the very sequences whose reference log-probs were cached."""
    raw = tiny_config("alright", max_steps=1, eval_batch_size=2)  # 4 eval items: 2 batches
    train_file, eval_file = feedback_files["label"]
    raw["data"]["pref"] = {"train": str(train_file), "eval": str(eval_file)}
    raw["objectives"] = {"pref": {"name": "kto"}}
    _, evals = run(raw)
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # r = 0 and z = 0 on every eval batch: each KTO term is 1 - sigmoid(0)
    assert evals[0]["loss_kto"] == pytest.approx(0.5, abs=1e-6)


def test_a_new_objective_with_an_auxiliary_input_needs_no_trainer_change(
    tiny_config, feedback_files
):
    """An objective declares the auxiliary inputs it consumes; the data layer builds them, the
    session scores them and fills the bundle's field: one function and one register line."""
    import torch.nn.functional as F

    from unitune.objectives import REGISTRY, register

    def kl_hinge(fb, *, beta: float = 0.1):
        z = fb.kl.ratio.mean().clamp(min=0).detach()
        return F.softplus(-beta * (fb.seq.ratio - z)).mean()

    register(kl_hinge, name="kl_hinge", data="unpaired", needs_ref=True, inputs=("kl",),
             source="test")  # fmt: skip
    try:
        raw = tiny_config("pref", max_steps=2, eval_every=2)
        raw["data"]["sft"] = None
        train_file, eval_file = feedback_files["label"]
        raw["data"]["pref"] = {"train": str(train_file), "eval": str(eval_file)}
        raw["objectives"] = {"pref": {"name": "kl_hinge"}}
        summary, evals = run(raw)
        trains = [json.loads(x) for x in (Path(raw["output_dir"]) / "metrics.jsonl").open()]
        assert all("kl" in r for r in trains if r["type"] == "train")
        assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_theta = pi_ref at the start
        assert math.isfinite(evals[-1]["loss_kl_hinge"])
    finally:
        del REGISTRY["kl_hinge"]
