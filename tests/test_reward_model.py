"""The `reward_model` job: Bradley–Terry reward models trained through `unitune train`."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_jsonl
from test_hub import hub as local_hub  # noqa: F401  (a fixture: the local Hub)
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import ConfigError, parse_config
from unitune.objectives.reward import bradley_terry

runner = CliRunner()


def rm_config(tiny_config, tmp_path, name: str = "rm", **train) -> dict:
    """tiny_config as a reward-model job on the tiny pairs (no SFT data, no schedule)."""
    cfg = tiny_config("reward_model", **train)
    cfg.update(name=name, job="reward_model", output_dir=str(tmp_path / "runs" / name))
    del cfg["data"]["sft"], cfg["schedule"]
    return cfg


def run(tmp_path, cfg: dict, *args: str):
    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return runner.invoke(app, ["train", str(path), "--no-progress", *args])


def lines(run_dir, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == kind]


# ------------------------------------------------------------------------------------ the loss
def test_bradley_terry_by_hand_and_as_trl() -> None:
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d), d = 1, 0, -2
    by_hand = (
        torch.log1p(torch.exp(torch.tensor(-1.0)))
        + torch.log(torch.tensor(2.0))
        + torch.log1p(torch.exp(torch.tensor(2.0)))
    ) / 3
    assert bradley_terry(rc, rr).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert bradley_terry(rc, rc).item() == pytest.approx(0.6931472, rel=1e-6)  # log 2
    margin = torch.tensor([0.5, 0.0, 1.0])
    # TRL 1.x RewardTrainer.compute_loss: -logsigmoid(rewards_chosen - rewards_rejected [- margin])
    # .mean(), the rewards being the model's logits split into chosen and rejected halves
    logits = torch.cat([rc, rr]).unsqueeze(-1)
    trl_c, trl_r = torch.chunk(logits.squeeze(-1), chunks=2)
    assert torch.equal(bradley_terry(rc, rr), -F.logsigmoid(trl_c - trl_r).mean())
    assert torch.equal(bradley_terry(rc, rr, margin), -F.logsigmoid(trl_c - trl_r - margin).mean())


def test_trl_reward_trainer_loss_is_this_formula() -> None:
    """The installed TRL's RewardTrainer still computes the loss the test above mirrors."""
    import inspect

    from trl import RewardTrainer

    src = inspect.getsource(RewardTrainer.compute_loss)
    assert "-nn.functional.logsigmoid(rewards_chosen - rewards_rejected).mean()" in src
    assert 'logsigmoid(rewards_chosen - rewards_rejected - inputs["margin"])' in src


# ----------------------------------------------------------------------------- training, saving
def test_reward_model_learns_saves_and_judges(tiny_config, tmp_path) -> None:
    cfg = rm_config(tiny_config, tmp_path, max_steps=12, eval_every=4)
    res = run(tmp_path, cfg)
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "rm"
    train, evals = lines(out, "train"), lines(out, "eval")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "accuracy", "margin"} <= set(train[0])
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all({"loss", "accuracy", "margin"} <= set(r) for r in evals)
    assert evals[-1]["pairs"] == 3
    assert evals[-1]["accuracy"] == 1.0 > 0.5
    assert evals[-1]["loss"] < evals[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "reward_model" and summary["name"] == "rm"
    assert summary["steps"] == {"reward_model": 12}
    assert summary["final"]["accuracy"] == 1.0 and summary["peak_rss_mb"] > 0
    assert summary["wall_s"] >= summary["train_s"] > 0

    # its model card: the reward model's, with summary.json's final held-out figures
    from test_modelcard import metrics_table

    from unitune.training.modelcard import front_matter

    card = (out / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    table = metrics_table(card)
    want = {k: v for k, v in summary["final"].items() if k in ("loss", "accuracy", "margin")}
    assert set(want) <= set(table) and table["pairs"] == summary["final"]["pairs"] == 3
    for k, v in want.items():
        assert table[k] == pytest.approx(v, abs=5e-5), k
    assert f"| pref | `pref_train.jsonl` | {summary['data']['pref']['train']} |" in card
    assert str(tmp_path) not in card and "rm:path/to/rm/model" in card

    # the saved directory is a plain transformers reward model that gives the trained rewards
    model_dir = out / "model"
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    from transformers import AutoTokenizer

    from unitune.data import load_preference
    from unitune.training.reward_model import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = load_preference(cfg["data"]["pref"]["eval"], tok, max_length=64)
    again = evaluate(rm, list(pairs), tok.pad_token_id, torch.device("cpu"), 8)
    assert again["loss"] == pytest.approx(evals[-1]["loss"], abs=1e-6)
    assert again["accuracy"] == 1.0

    # and unitune's rm: judge scores the chosen answers above the rejected ones
    from unitune.judges.registry import make_judge

    judge = make_judge(f"rm:{model_dir}")
    prompts = ["Describe a hen.", "Describe a gnu."]
    good = judge.score(prompts, ["A hen is a WONDERFUL animal!", "A gnu is a WONDERFUL animal!"],
                       ["", ""])  # fmt: skip
    bad = judge.score(prompts, ["A hen is an animal.", "A gnu is an animal."], ["", ""])
    assert all(g > b for g, b in zip(good, bad, strict=True)), (good, bad)


def test_lora_reward_model_saves_merged(tiny_config, tmp_path) -> None:
    cfg = rm_config(tiny_config, tmp_path, name="rm-lora", max_steps=3, eval_every=3)
    cfg["model"]["lora"] = {"r": 4, "alpha": 8}
    res = run(tmp_path, cfg)
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "rm-lora"
    model_dir = out / "model"
    assert not (model_dir / "adapter_config.json").exists()  # merged: a plain model
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    from transformers import AutoTokenizer

    from unitune.data import load_preference
    from unitune.training.reward_model import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs, _ = load_preference(cfg["data"]["pref"]["eval"], tok, max_length=64)
    again = evaluate(rm, list(pairs), tok.pad_token_id, torch.device("cpu"), 8)
    assert again["loss"] == pytest.approx(lines(out, "eval")[-1]["loss"], abs=1e-5)


# ------------------------------------------------------------------------------ push_to_hub
def with_push(cfg: dict, repo: str):
    """The config with `train.push_to_hub` set, parsed as a config file is."""
    return parse_config({**cfg, "train": {**cfg["train"], "push_to_hub": repo}})


def test_a_saved_reward_model_config_reads_back(tiny_config, tmp_path):
    """config.yaml of a reward-model run (every section written out, the default objectives
    included) parses again to the same config: `unitune push RUN_DIR` rebuilds its card."""
    import yaml

    from unitune.config import dump_config

    cfg = with_push(rm_config(tiny_config, tmp_path, name="rm-again"), "someone/rm")
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert dump_config(again) == dump_config(cfg)


def test_push_to_hub_uploads_the_model_with_its_card(local_hub, tiny_config, tmp_path):  # noqa: F811
    """`train.push_to_hub`: after saving, the model directory goes to the Hub (a local server
    answering HTTP 500): the create-repo request names the repo, the failure is one HubError
    line saying where the model is kept, and the card names the repo; no token in any file."""
    from test_hub import TOKEN, create_requests

    from unitune.training.hub import HubError
    from unitune.training.reward_model import train_reward_model

    cfg = with_push(rm_config(tiny_config, tmp_path, name="rm-push", max_steps=1, eval_every=1),
                    "someone/tiny-rm")  # fmt: skip
    with pytest.raises(HubError) as err:
        train_reward_model(cfg, progress=False)
    (req,) = create_requests(local_hub)
    assert json.loads(req[3])["name"] == "tiny-rm"
    out = tmp_path / "runs" / "rm-push"
    msg = str(err.value)
    assert "\n" not in msg and TOKEN not in msg
    assert msg.startswith("push to someone/tiny-rm failed: ")
    assert f"saved locally at {out / 'model'}" in msg and f"unitune push {out}" in msg
    card = (out / "model" / "README.md").read_text()
    assert 'AutoModelForSequenceClassification.from_pretrained("someone/tiny-rm")' in card
    assert "rm:someone/tiny-rm" in card
    assert json.loads((out / "summary.json").read_text())["steps"] == {"reward_model": 1}
    for f in ("config.yaml", "summary.json", "model/README.md", "metrics.jsonl"):
        assert TOKEN not in (out / f).read_text(), f


def test_push_without_a_token_fails_before_training(tiny_config, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    from unitune.training.hub import HubError
    from unitune.training.reward_model import train_reward_model

    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = with_push(rm_config(tiny_config, tmp_path, name="rm-no-token"), "someone/x")
    with pytest.raises(HubError, match="train.push_to_hub: no Hugging Face token"):
        train_reward_model(cfg, progress=False)
    assert not (tmp_path / "runs" / "rm-no-token").exists()


# ------------------------------------------------------------------------------------- resume
def test_resume_is_bitwise_the_uninterrupted_run(tiny_config, tmp_path) -> None:
    from safetensors.torch import load_file

    whole = rm_config(tiny_config, tmp_path, name="whole", max_steps=4, eval_every=2)
    assert run(tmp_path, whole).exit_code == 0
    part = rm_config(tiny_config, tmp_path, name="part", max_steps=2, eval_every=2, save_every=2)
    assert run(tmp_path, part).exit_code == 0
    part["train"]["max_steps"] = 4
    res = run(tmp_path, part, "--resume")
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output
    a = load_file(tmp_path / "runs" / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("eval_s", "elapsed_s", "step_s")
    wa = [
        {k: v for k, v in r.items() if k not in strip}
        for r in lines(tmp_path / "runs" / "whole", "train")
    ]
    wb = [
        {k: v for k, v in r.items() if k not in strip}
        for r in lines(tmp_path / "runs" / "part", "train")
    ]
    assert wa == wb


def test_sigterm_checkpoints_and_resumes_bitwise(tiny_config, tmp_path, monkeypatch) -> None:
    """SIGTERM after step 2: the step is checkpointed (save_every is off), the CLI exits
    128 + SIGTERM naming --resume, and the resumed run ends on the uninterrupted run's weights."""
    import os
    import signal

    from safetensors.torch import load_file

    from unitune.training import checkpoint, reward_model

    whole = rm_config(tiny_config, tmp_path, name="whole", max_steps=4, eval_every=2)
    assert run(tmp_path, whole).exit_code == 0
    step = reward_model.train_step

    def signalled(*args, **kw):
        line = step(*args, **kw)
        if line["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return line

    monkeypatch.setattr(reward_model, "train_step", signalled)
    cut = rm_config(tiny_config, tmp_path, name="cut", max_steps=4, eval_every=2)
    res = run(tmp_path, cut)
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "--resume" in res.output
    out = tmp_path / "runs" / "cut"
    (ckpt,) = checkpoint.list_checkpoints(out)
    assert checkpoint.verify(ckpt)["step"] == 2 and not (out / "model").exists()
    monkeypatch.setattr(reward_model, "train_step", step)
    res = run(tmp_path, cut, "--resume")
    assert res.exit_code == 0, res.output
    a = load_file(tmp_path / "runs" / "whole" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in lines(out, "eval")] == [0, 2, 4]


# ---------------------------------------------------------------------------------- bad input
def test_reward_model_config_errors(tiny_config, tmp_path) -> None:
    base = rm_config(tiny_config, tmp_path)
    cases = {
        "needs data.pref": lambda c: c["data"].pop("pref"),
        "data.sft": lambda c: c["data"].update(sft={"train": "x.jsonl"}),
        "schedule.name 'mix'": lambda c: c.update(schedule={"name": "mix"}),
        "objectives": lambda c: c.update(objectives={"pref": {"name": "ipo"}}),
        "eval.generate": lambda c: c.update(eval={"generate": True}),
    }
    for needle, change in cases.items():
        cfg = json.loads(json.dumps(base))
        change(cfg)
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as err:
            parse_config(cfg)
        assert "\n" not in str(err.value)


def test_unpaired_data_is_a_one_line_error(tiny_config, tmp_path) -> None:
    cfg = rm_config(tiny_config, tmp_path, name="unpaired")
    rows = [{"prompt": "Describe a cat.", "completion": "A cat.", "label": True}] * 4
    cfg["data"]["pref"]["train"] = str(write_jsonl(tmp_path / "kto.jsonl", rows))
    res = run(tmp_path, cfg)
    assert res.exit_code != 0
    assert "needs preference pairs" in res.output and "kto.jsonl" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "runs" / "unpaired").exists()  # nothing written before the error


def test_report_skips_a_reward_model_run_with_a_note(tmp_path) -> None:
    """`unitune report` compares schedules' runs on f_sft / f_pref; a reward model has neither."""
    from unitune.study.report.collect import find_runs

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "summary.json").write_text(json.dumps({"job": "reward_model"}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"job": "train"}))
    found, notes = find_runs([tmp_path])
    assert found == [tmp_path / "run"]
    assert len(notes) == 1 and "rm" in notes[0] and "reward_model" in notes[0]


def test_two_processes_are_one_process_with_accumulation(tiny_config, tmp_path) -> None:
    """DDP (torchrun, 2 CPU processes, gloo) = 1 process with grad_accum 2: each rank draws
    every other batch and the gradients are averaged; one writer for every file."""
    from safetensors.torch import load_file
    from test_distributed import torchrun

    two = rm_config(tiny_config, tmp_path, name="two", max_steps=4, eval_every=2, batch_size=2)
    two["train"]["save_every"] = 2
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two))
    # the same on 2 processes cut at step 2 and resumed from its checkpoint, in the same launch
    cut = {**two, "name": "cut", "output_dir": str(tmp_path / "runs" / "cut")}
    cut2, cut4 = tmp_path / "cut2.yaml", tmp_path / "cut4.yaml"
    cut2.write_text(yaml.safe_dump({**cut, "train": {**cut["train"], "max_steps": 2}}))
    cut4.write_text(yaml.safe_dump(cut))
    from unitune.training.checkpoint import step_path

    torchrun([path, cut2, f"{cut4}@{step_path(cut['output_dir'], 2)}"], tmp_path)
    one = rm_config(tiny_config, tmp_path, name="one", max_steps=4, eval_every=2, batch_size=2,
                    grad_accum=2)  # fmt: skip
    assert run(tmp_path, one).exit_code == 0
    a = load_file(tmp_path / "runs" / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    for kind in ("train", "eval"):
        la, lb = lines(tmp_path / "runs" / "one", kind), lines(tmp_path / "runs" / "two", kind)
        assert [r["step"] for r in la] == [r["step"] for r in lb]  # each line once
        for ra, rb in zip(la, lb, strict=True):
            assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
            assert ra["accuracy"] == pytest.approx(rb["accuracy"])
    c = load_file(tmp_path / "runs" / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)  # resumed on 2 processes: bitwise
    summary = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4


# ----------------------------------------------------------------------- what rm: PATH reads
@pytest.mark.parametrize("plain", [False, True], ids=["conversational", "plain-text"])
def test_rm_path_scores_exactly_what_the_job_trained_on(plain, tiny_config, tmp_path) -> None:
    """The reward of an answer read through `rm:PATH` is the job's own reward of the same pair
    side (the data loader's tokens: nothing after the answer's end of turn, which the chat
    template's full rendering adds, "\\n" after ChatML's <|im_end|>), for conversational and
    plain-text pairs; a reward model from elsewhere reads the full chat template (TRL)."""
    from conftest import pref_records

    from unitune.data import load_preference
    from unitune.judges.reward_model import READS_KEY, load_reward_model
    from unitune.training.reward_model import rewards

    cfg = rm_config(tiny_config, tmp_path, name="rm-reads", max_steps=2, eval_every=2)
    records = pref_records(["cat", "dog", "owl"])
    if plain:
        records = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                    "rejected": r["rejected"][0]["content"]} for r in records]  # fmt: skip
    cfg["data"]["pref"] = {"train": str(write_jsonl(tmp_path / "p.jsonl", records * 4)),
                           "eval": str(write_jsonl(tmp_path / "e.jsonl", records))}  # fmt: skip
    assert run(tmp_path, cfg).exit_code == 0
    model_dir = tmp_path / "runs" / "rm-reads" / "model"
    judge = load_reward_model(str(model_dir), device="cpu")
    pairs, _ = load_preference(str(tmp_path / "e.jsonl"), judge.tokenizer, max_length=64)
    with torch.no_grad():
        chosen, rejected = rewards(judge.model, list(pairs), judge.tokenizer.pad_token_id,
                                   torch.device("cpu"))[:2]  # fmt: skip
    prompts = [r["prompt"] for r in records]
    text = [r["chosen"] if plain else r["chosen"][0]["content"] for r in records]
    assert judge.score(prompts, text, [""] * 3) == pytest.approx(chosen.tolist(), abs=1e-5)
    text = [r["rejected"] if plain else r["rejected"][0]["content"] for r in records]
    assert judge.score(prompts, text, [""] * 3) == pytest.approx(rejected.tolist(), abs=1e-5)
    if not plain:  # without the mark it reads TRL's rendering: the template's tail included
        delattr(judge.model.config, READS_KEY)
        full = judge.tokenizer.apply_chat_template(
            [*prompts[0], {"role": "assistant", "content": text[0]}], tokenize=False
        )
        assert judge.ids(prompts[0], text[0]) == judge.tokenizer(full)["input_ids"]
        assert len(judge.ids(prompts[0], text[0])) > len(judge.data_ids(prompts[0], text[0]))
