"""`train.compile`: the decoder compiled for the training passes (training/policy.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import cut_run, final_weights, run_records

from unitune.config import ConfigError, parse_config
from unitune.jobs import train


def test_a_compiled_run_trains_what_the_eager_run_trains_and_resumes_bitwise(tiny_config, tmp_path):
    """SFT and DPO jointly (ALRIGHT), compiled and eager: the same losses and weights to float
    rounding, the same saved tensor names (nothing of the compiled wrapper is saved); resumed
    from a checkpoint, the compiled run ends bit for bit on its uninterrupted self (the warm-up
    batch fixes the kernels inductor picks)."""
    raw = tiny_config("alright", max_steps=4, save_every=2, keep_last=4)
    eager = {**raw, "output_dir": str(tmp_path / "eager")}
    compiled = {**raw, "output_dir": str(tmp_path / "compiled")}
    compiled["train"] = {**raw["train"], "compile": True}
    train(parse_config(eager), progress=False)
    train(parse_config(compiled), progress=False)
    a, b = run_records(tmp_path / "eager"), run_records(tmp_path / "compiled")
    assert [r["type"] for r in a] == [r["type"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k, v in x.items():
            if isinstance(v, float) and not k.startswith(("time", "phase")):
                assert y[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    wa, wb = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=5e-5)
    full, cut = tmp_path / "compiled", tmp_path / "cut"
    cut_run(full, cut, 2)
    train(parse_config({**compiled, "output_dir": str(cut)}), progress=False, resume=True)
    assert run_records(cut) == run_records(full)
    got, want = final_weights(cut), final_weights(full)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_compile_where_nothing_would_be_compiled_is_refused(tiny_config):
    raw = tiny_config("alright")
    raw["train"]["compile"] = True
    with pytest.raises(ConfigError, match="not with train.packing"):
        parse_config({**raw, "train": {**raw["train"], "packing": True}})
    ift = tiny_config("sft")
    ift["train"]["compile"] = True
    ift["objectives"] = {"sft": {"name": "ift"}}
    with pytest.raises(ConfigError, match="nothing would be compiled"):
        parse_config(ift)
    parse_config(raw)  # SFT and DPO: compiled


def test_compile_is_refused_by_the_reward_model_job(tiny_config):
    raw = tiny_config("reward_model", compile=True)
    raw["job"] = "reward_model"
    del raw["data"]["sft"], raw["schedule"]
    with pytest.raises(ConfigError, match="train.compile"):
        parse_config(raw)


def test_compiled_decoder_is_not_a_submodule():
    """The compiled decoder is held beside the model: the wrapper's parameters and state are
    the model's own, once; the warm-up leaves no gradient and the random state as it was."""
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.training.policy import PolicyLogps

    model, _ = load_model(ModelConfig(name="builtin:tiny"))
    plain = PolicyLogps(model, 1024)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    comp = PolicyLogps(model, 1024, compile=True)
    assert torch.equal(torch.rand(3), want)
    assert comp.compiled is not None and plain.compiled is None
    assert list(comp.state_dict()) == list(plain.state_dict())
    assert len(list(comp.parameters())) == len(list(plain.parameters()))
    assert all(p.grad is None for p in model.parameters())
