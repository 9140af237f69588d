"""Exact resume: a run resumed from any checkpoint continues bit for bit like the uninterrupted run
(torchtitan's checkpoint test, OpenRLHF's resume matrix), for every schedule."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, TIMING, final_weights, run_records, write_jsonl

from unitune.config import parse_config
from unitune.jobs import train
from unitune.training import checkpoint
from unitune.training.resume import ResumeError

T = 8  # steps; batch 4 of 24 items: an epoch is 6 batches


@pytest.fixture
def label_files(tmp_path):
    def rows(animals):
        return [
            {"prompt": f"Describe a {a}.", "completion": f" A {a} is {('dull', 'great')[i % 2]}.",
             "label": bool(i % 2)}
            for i, a in enumerate(animals)
        ]  # fmt: skip

    return (
        write_jsonl(tmp_path / "fb_train.jsonl", rows(ANIMALS * 2)),
        write_jsonl(tmp_path / "fb_eval.jsonl", rows(["hen", "ram", "gnu", "doe"])),
    )


def config(tiny_config, label_files, schedule: str, grad_accum: int) -> dict:
    name = "alright" if schedule == "kto" else schedule
    raw = tiny_config(name, max_steps=T, eval_every=2, grad_accum=grad_accum, save_every=1,
                      keep_last=T)  # fmt: skip
    if schedule == "kto":
        raw["data"]["pref"] = {"train": str(label_files[0]), "eval": str(label_files[1])}
        raw["objectives"] = {"pref": {"name": "kto"}}
    raw["output_dir"] += f"-{schedule}-{grad_accum}"
    return raw


def interruptions(grad_accum: int) -> dict[str, int]:
    """Steps to resume from: early, mid-epoch and exactly at an epoch's end."""
    return {"early": 1, "mid_epoch": 5 if grad_accum == 1 else 4, "epoch_end": 6 // grad_accum}


# every schedule with one micro-batch per step; with two, those whose state moves inside a step
# (ALRIGHT's draw, MAXRIGHT's probe on the first micro-batch, KTO's KL partition)
CASES = [(s, 1) for s in ("sft", "pref", "sequential", "mix", "alright", "maxright", "kto")] + [
    (s, 2) for s in ("alright", "maxright", "kto")
]


@pytest.mark.parametrize(("schedule", "grad_accum"), CASES)
def test_resume_is_bitwise_identical(tiny_config, label_files, tmp_path, schedule, grad_accum):
    raw = config(tiny_config, label_files, schedule, grad_accum)
    full = Path(raw["output_dir"])
    whole = train(parse_config(raw), progress=False)
    want_records, want_weights = run_records(full), final_weights(full)
    for where, step in interruptions(grad_accum).items():
        # the run as a crash after `step` leaves it: later checkpoints, log lines and model gone
        cut = tmp_path / f"cut-{where}"
        shutil.copytree(full, cut, ignore=shutil.ignore_patterns("model", "summary.json"))
        for ckpt in checkpoint.list_checkpoints(cut):
            if checkpoint.step_of(ckpt) > step:
                shutil.rmtree(ckpt)
        resumed = train(parse_config({**raw, "output_dir": str(cut)}), progress=False,
                        resume=True)  # fmt: skip
        assert run_records(cut) == want_records, where
        got = final_weights(cut)
        assert got.keys() == want_weights.keys()
        assert all(torch.equal(got[k], want_weights[k]) for k in got), where
        assert resumed["steps"] == whole["steps"] and resumed["final"]["step"] == T
        shutil.rmtree(cut)
    shutil.rmtree(full)


def test_sequential_resume_after_the_switch_recomputes_a_cleared_reference(
    tiny_config, label_files, tmp_path
):
    """The preference stage's reference (the model at the switch) is not in the checkpoint: with
    the cache cleared it is recomputed from the checkpoint pinned at the switch."""
    raw = config(tiny_config, label_files, "sequential", 1)
    raw["train"]["keep_last"] = 3  # the newest three, plus the pinned switch point
    full = Path(raw["output_dir"])
    train(parse_config(raw), progress=False)
    steps = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(full)]
    assert steps == [4, 6, 7, 8]  # the switch (lam 0.5 of 8 steps) is kept
    want = run_records(full)
    shutil.rmtree(Path(raw["cache_dir"]) / "refs")
    (full / "summary.json").unlink()
    for step in (7, 8):  # back to step 6, in the preference stage
        shutil.rmtree(full / "checkpoints" / checkpoint.dir_name(step))
    resumed = train(parse_config(raw), progress=False, resume=True)
    assert run_records(full) == want and resumed["final"]["step"] == T


def test_resume_refuses_a_changed_config_by_key(tiny_config, label_files):
    raw = config(tiny_config, label_files, "alright", 1)
    raw["train"]["max_steps"] = 2
    train(parse_config(raw), progress=False)
    changed = {**raw, "train": {**raw["train"], "lr": 1e-2, "max_steps": 4},
               "schedule": {**raw["schedule"], "lam": 0.25}}  # fmt: skip
    with pytest.raises(ResumeError, match=r"schedule\.lam \(0\.5 -> 0\.25\); train\.lr"):
        train(parse_config(changed), progress=False, resume=True)
    # max_steps may change under a constant LR, not where the LR's decay is scaled to it
    decaying = {**raw, "train": {**raw["train"], "max_steps": 4, "lr_schedule": "linear"}}
    with pytest.raises(ResumeError, match=r"train\.lr_schedule \('constant' -> 'linear'\)"):
        train(parse_config(decaying), progress=False, resume=True)
    # the run goes on to the new end
    longer = {**raw, "train": {**raw["train"], "max_steps": 4}}
    assert train(parse_config(longer), progress=False, resume=True)["final"]["step"] == 4


def test_resume_refuses_a_longer_run_whose_lr_decays_to_the_old_end(tiny_config, label_files):
    """A linear or cosine LR reaches 0 at max_steps: the steps trained so far followed the old
    end, so a longer resumed run would not be the run its config describes."""
    raw = config(tiny_config, label_files, "alright", 1)
    raw["train"] |= {"max_steps": 2, "lr_schedule": "cosine"}
    train(parse_config(raw), progress=False)
    longer = {**raw, "train": {**raw["train"], "max_steps": 4}}
    with pytest.raises(ResumeError, match=r"train\.max_steps \(2 -> 4\).*lr_schedule 'cosine'"):
        train(parse_config(longer), progress=False, resume=True)


def test_resume_refuses_a_new_max_steps_where_the_schedule_plans_by_it(tiny_config, label_files):
    """sequential switches at round((1 - lam) * max_steps): a run stopped at step 3 of 3 (switch
    at 2) and resumed to 6 (switch at 3) would switch its reference twice. Refused by name, from
    the CLI as one line; the same max_steps resumes."""
    from typer.testing import CliRunner

    from unitune.cli import app

    raw = config(tiny_config, label_files, "sequential", 1)
    raw["train"]["max_steps"] = 3
    train(parse_config(raw), progress=False)
    longer = {**raw, "train": {**raw["train"], "max_steps": 6}}
    want = "cannot resume: schedule sequential plans by train.max_steps (3 -> 6)"
    with pytest.raises(ResumeError) as refused:
        train(parse_config(longer), progress=False, resume=True)
    assert str(refused.value) == want
    path = Path(raw["output_dir"]).parent / "longer.yaml"
    path.write_text(json.dumps(longer))
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert want in " ".join(result.output.split())
    assert train(parse_config(raw), progress=False, resume=True)["final"]["step"] == 3


def test_resumable_fields_are_declared_by_the_config():
    """Which keys a resumed run may change is each field's own declaration (config.py), read by
    the diff; a section's fields are found by their dotted path."""
    from unitune.training.resume import resumable, resumable_keys

    keys = resumable_keys()
    assert {"name", "output_dir", "cache_dir", "train.max_steps", "train.save_every",
            "eval.judge", "eval.retention_tasks"} <= set(keys)  # fmt: skip
    assert not {"train.lr", "train.seed", "eval.beta", "schedule.lam", "model.name"} & set(keys)
    assert resumable("train.keep_last") and not resumable("train.batch_size")
    assert not resumable("schedule.k") and not resumable("nothing.here")


def test_resume_refuses_reference_log_probs_of_changed_data(tiny_config, label_files, tiny_data):
    raw = config(tiny_config, label_files, "mix", 1)
    raw["train"]["max_steps"] = 2
    train(parse_config(raw), progress=False)
    rows = [json.loads(x) for x in tiny_data["pref_eval"].open()]
    rows[0]["chosen"][0]["content"] += " Edited."
    write_jsonl(tiny_data["pref_eval"], rows)  # edited in place after the checkpoint
    longer = {**raw, "train": {**raw["train"], "max_steps": 4}}
    with pytest.raises(ResumeError, match="reference log-probs of pref/eval/main"):
        train(parse_config(longer), progress=False, resume=True)


def test_parallel_resumes_branch_by_branch(tiny_config, label_files):
    """A finished branch is kept; the interrupted one resumes; the merge is the same."""
    raw = config(tiny_config, label_files, "sft", 1)
    raw["job"], raw["schedule"] = "parallel", {}
    raw["parallel"] = {"l1": 1e-4, "merge": {"method": "task_arithmetic"}}
    raw["train"] |= {"max_steps": 4, "keep_last": 4}
    out = Path(raw["output_dir"])
    whole = train(parse_config(raw), progress=False)
    # as if killed in the preference branch after its step 2
    (out / "pref" / "summary.json").unlink()
    shutil.rmtree(out / "pref" / "model")
    for step in (3, 4):
        shutil.rmtree(out / "pref" / "checkpoints" / checkpoint.dir_name(step))
    (out / "summary.json").unlink()
    resumed = train(parse_config(raw), progress=False, resume=True)
    timeless = lambda d: {k: v for k, v in d.items() if k not in TIMING}  # noqa: E731
    assert timeless(resumed["final"]) == timeless(whole["final"])
    for kind in ("sft", "pref"):
        drop = set(TIMING)
        got, want = resumed["branches"][kind], whole["branches"][kind]
        assert {k: v for k, v in got.items() if k not in drop} == {
            k: v for k, v in want.items() if k not in drop
        }


def test_a_checkpoint_from_before_a_new_key_resumes_with_its_default(tiny_config, label_files):
    """A key added after a checkpoint was written had its default's effect then: no change."""
    from unitune.training.resume import config_changes, with_defaults

    now = parse_config(config(tiny_config, label_files, "mix", 1)).model_dump(mode="json")
    old = json.loads(json.dumps(now))
    del old["eval"]["generate"], old["train"]["report_to"]
    assert config_changes(with_defaults(old), now) == []
    old["eval"]["beta"] = 0.2  # what f_pref measures: not resumable
    assert config_changes(with_defaults(old), now) == ["eval.beta (0.2 -> 0.1)"]
