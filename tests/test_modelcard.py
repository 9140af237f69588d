"""The model card (RUN_DIR/model/README.md): Hugging Face front matter that parses, the run's
settings, and the final metrics of summary.json; no secrets, no home paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unitune.config import parse_config
from unitune.jobs import train
from unitune.training.modelcard import front_matter, model_card


def metrics_table(card: str) -> dict[str, float]:
    """The rows of the card's final-metrics table: metric -> value."""
    section = card.split("## Final metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| ([-\d.e+]+) \|", section, re.MULTILINE)
    return {k: float(v) for k, v in rows}


def test_card_of_a_tiny_run(tiny_config):
    cfg = parse_config(tiny_config("alright"))
    summary = train(cfg, progress=False)
    out = Path(cfg.output_dir)
    card = (out / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert card.startswith("---\n") and meta
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["unitune", "sft", "dpo", "alright"]
    assert meta["datasets"] == ["sft_train.jsonl", "pref_train.jsonl"]
    assert "base_model" not in meta and "license" not in meta  # builtin:tiny: random, no hub id
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final"] == summary["final"]
    table = metrics_table(card)
    want = {k: v for k, v in saved["final"].items()
            if k in ("f_sft", "f_pref", "reward_acc", "reward_margin", "deviation",
                     "ideal_distance")}  # fmt: skip
    assert set(want) <= set(table)
    for k, v in want.items():
        assert table[k] == pytest.approx(v, abs=5e-5), k
    for text in ("`alright`", "| lam (weight of the preference objective) | 0.5 |", "| seed | 0 |",
                 f"sft: {saved['steps']['sft']}, pref: {saved['steps']['pref']}",
                 "AutoModelForCausalLM.from_pretrained", "unitune 0.1.0"):  # fmt: skip
        assert text in card, text
    assert str(Path(cfg.data.sft.train).parent) not in card  # data named by file name only


SUMMARY = {
    "name": "card",
    "final": {"step": 8, "f_sft": 3.25, "f_pref": 0.125, "reward_acc": 1.0, "eval_s": 0.5},
    "measures": {"f_sft": "held-out NLL per response token"},
    "steps": {"sft": 4, "pref": 4},
    "data": {"sft": {"kind": "sft", "train": 10, "eval": 2}},
}


def card_for(tiny_config, **model) -> tuple[str, dict]:
    raw = tiny_config("mix")
    raw["model"].update(model)
    card = model_card(parse_config(raw), SUMMARY)
    return card, front_matter(card)


def test_builtin_smollm2_names_its_hub_base_and_license(tiny_config):
    card, meta = card_for(tiny_config, name="builtin:smollm2-135m")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert metrics_table(card) == {"f_sft": 3.25, "f_pref": 0.125, "reward_acc": 1.0}


def test_hub_base_lora_adapter(tiny_config):
    card, meta = card_for(tiny_config, name="org/base-model", lora={"r": 4})
    assert meta["base_model"] == "org/base-model" and "license" not in meta
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "AutoPeftModelForCausalLM" in card and "| LoRA | r=4" in card


def test_local_base_by_name_with_its_license(tiny_config, tmp_path):
    base = tmp_path / "models" / "my-base"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    card, meta = card_for(tiny_config, name=str(base))
    assert "base_model" not in meta and meta["license"] == "mit"
    assert "`my-base`" in card and str(base) not in card


def test_no_secrets_and_no_home(tiny_config, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandbkey-0123456789")
    raw = tiny_config("mix", push_to_hub="someone/card")
    raw["name"] = "run-wandbkey-0123456789"
    raw["data"]["sft"]["train"] = str(Path.home() / "secret-dir" / "sft.jsonl")
    card = model_card(parse_config(raw), {**SUMMARY, "name": raw["name"]})
    assert "wandbkey-0123456789" not in card and "run-***" in card
    assert str(Path.home()) not in card and "secret-dir" not in card
    assert 'from_pretrained("someone/card")' in card


def test_card_of_a_parallel_job_names_the_job_and_its_merge(tiny_config):
    """The parallel job's card (`unitune push` of its run): the `parallel` schedule row and tag,
    both objectives and both datasets, and the merge of `parallel.merge`."""
    raw = tiny_config("parallel")
    raw["parallel"] = {"l1": 1e-3, "merge": {"method": "ties", "weights": [1.0, 0.25]}}
    card = model_card(parse_config(raw), SUMMARY)
    meta = front_matter(card)
    assert meta["tags"] == ["unitune", "sft", "dpo", "parallel"]
    assert meta["datasets"] == ["sft_train.jsonl", "pref_train.jsonl"]
    for text in ("under the `parallel` schedule", "| schedule | `parallel` |",
                 "| merge | ties (weights [1.0, 0.25]) |"):  # fmt: skip
        assert text in card, text
    assert "alright" not in card  # the default schedule name of a parallel job's config


# ----------------------------------------------------------------------- the reward-model card
RM_SUMMARY = {
    "name": "rm",
    "job": "reward_model",
    "final": {
        "step": 6,
        "loss": 0.4375,
        "accuracy": 0.75,
        "margin": 1.5,
        "pairs": 4,
        "eval_s": 0.5,
        "elapsed_s": 2.0,
    },  # fmt: skip
    "steps": {"reward_model": 6},
    "global_batch": 4,
    "data": {"pref": {"kind": "pairs", "train": 12, "eval": 4}},
}


def rm_raw(tiny_config, **model) -> dict:
    raw = tiny_config("reward_model")
    raw.update(name="rm", job="reward_model")
    del raw["data"]["sft"], raw["schedule"]
    raw["model"].update(model)
    return raw


def test_reward_model_card(tiny_config):
    """A reward model's card: text-classification front matter, Bradley-Terry, the pairs
    counted, the held-out figures, scoring with AutoModelForSequenceClassification (logits[0, 0]
    over the chat template) and the rm: spec of online.rewards and eval.judge."""
    from unitune.training.modelcard import card_for, reward_model_card

    cfg = parse_config(rm_raw(tiny_config, name="builtin:smollm2-135m"))
    card = reward_model_card(cfg, RM_SUMMARY)
    assert card_for(cfg, RM_SUMMARY) == card  # picked by the job
    meta = front_matter(card)
    assert meta == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["unitune", "reward-model", "bradley-terry"],
        "datasets": ["pref_train.jsonl"],
        "pipeline_tag": "text-classification",
    }
    assert metrics_table(card) == {"loss": 0.4375, "accuracy": 0.75, "margin": 1.5, "pairs": 4}
    where = f"{Path(cfg.output_dir).name}/model"  # absolute output_dir: by its last component
    for text in ("A Bradley-Terry reward model", "higher score means a more preferred",
                 "| steps | 6 |", "| batch | 4 pairs per step (4 per process, grad_accum 1) |",
                 "| max_length | 64 |", "| pref | `pref_train.jsonl` | 12 | pref_eval.jsonl (4) |",
                 "AutoModelForSequenceClassification.from_pretrained(", "apply_chat_template",
                 "logits[0, 0]", f"  - rm:path/to/{where}",
                 f"judge: rm:path/to/{where}"):  # fmt: skip
        assert text in card, text
    for policy in ("AutoModelForCausalLM", "schedule", "lam", "text-generation"):
        assert policy not in card, policy
    assert str(Path(cfg.data.pref.train).parent) not in card and "/tmp" not in card


def test_reward_model_card_lora_secrets_and_repo(tiny_config, monkeypatch):
    from unitune.training.modelcard import reward_model_card

    monkeypatch.setenv("WANDB_API_KEY", "wandbkey-0123456789")
    raw = rm_raw(tiny_config, lora={"r": 4, "alpha": 8})
    raw["name"] = "rm-wandbkey-0123456789"
    raw["data"]["pref"]["train"] = str(Path.home() / "secret-dir" / "pairs.jsonl")
    card = reward_model_card(parse_config(raw), {**RM_SUMMARY, "name": raw["name"]},
                             repo_id="someone/tiny-rm")  # fmt: skip
    meta = front_matter(card)
    assert meta["tags"] == ["unitune", "reward-model", "bradley-terry", "lora"]
    assert meta["library_name"] == "transformers"  # LoRA merged: a plain model
    assert meta["datasets"] == ["pairs.jsonl"]
    assert "| LoRA | r=4, alpha=8, dropout=0.0, modules all-linear, merged into the saved " in card
    assert "wandbkey-0123456789" not in card and "# rm-***" in card
    assert str(Path.home()) not in card and "secret-dir" not in card
    assert 'AutoModelForSequenceClassification.from_pretrained("someone/tiny-rm")' in card
    assert "rm:someone/tiny-rm" in card


def test_card_from_a_reward_model_run(tiny_config, tmp_path):
    """`unitune push` of a reward-model run re-writes the reward model's card, not a policy's.
    (The config as written, not `dump_config`'s: config.py refuses the `objectives` section
    that dump writes for every job.)"""
    import yaml

    from unitune.training.modelcard import card_from_run

    run = tmp_path / "rm-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(rm_raw(tiny_config)))
    (run / "summary.json").write_text(json.dumps(RM_SUMMARY))
    card = card_from_run(run, repo_id="someone/rm")
    assert front_matter(card)["pipeline_tag"] == "text-classification"
    assert 'AutoModelForSequenceClassification.from_pretrained("someone/rm")' in card
