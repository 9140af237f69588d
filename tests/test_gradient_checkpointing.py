"""`train.gradient_checkpointing`: every decoder layer is recomputed in the backward pass, and the
gradients are the ones without it (full fine-tuning, LoRA, and IFT's two forwards)."""

import pytest
import torch
from conftest import final_weights
from run_parts import build

from unitune.config import parse_config
from unitune.jobs import train

# config, and the share of the layer forwards that run with grad (IFT's first pass, which only
# predicts the tokens fed to the second, runs without: nothing of it to recompute)
CASES = {
    "full": ({}, 1),
    "lora": ({"model": {"name": "builtin:tiny", "lora": {"r": 4}}}, 1),
    "ift": ({"objectives": {"sft": {"name": "ift"}}}, 0.5),
}


def grads_and_layer_calls(raw: dict, checkpointing: bool) -> tuple[dict, int, int]:
    raw = {**raw, "train": {**raw["train"], "gradient_checkpointing": checkpointing}}
    run = build(parse_config(raw))
    model = run.session.model
    layers = (
        model.get_base_model().model.layers if raw["model"].get("lora") else (model.model.layers)
    )
    calls = []
    # inside the checkpointed forward, so a recompute calls it again (a pre-hook: the recompute
    # stops early, as soon as the last activation the backward needs is back)
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    run.policy.module.train()
    loss = run.policy.loss("sft", [0, 1, 2]).value
    forwards = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, forwards, len(calls) - forwards


@pytest.mark.parametrize("case", CASES)
def test_checkpointing_recomputes_every_layer_for_the_same_gradients(case, tiny_config):
    extra, with_grad = CASES[case]
    raw = tiny_config("sft") | extra
    plain, fwd, recomputed = grads_and_layer_calls(raw, checkpointing=False)
    assert recomputed == 0
    ckpt, fwd_ckpt, recomputed_ckpt = grads_and_layer_calls(raw, checkpointing=True)
    assert fwd_ckpt == fwd and recomputed_ckpt == fwd * with_grad  # each layer's again in backward
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_a_run_with_checkpointing_trains_the_same_weights(tiny_config, tmp_path):
    runs = {}
    for on in (False, True):
        raw = tiny_config("alright", max_steps=3)
        raw["output_dir"] = str(tmp_path / f"gc-{on}")
        raw["train"]["gradient_checkpointing"] = on
        train(parse_config(raw), progress=False)
        runs[on] = final_weights(tmp_path / f"gc-{on}")
    for name, w in runs[False].items():
        torch.testing.assert_close(runs[True][name], w, rtol=1e-5, atol=1e-6)
