"""unitune on every decoder architecture it claims (README, "Architectures"): small random models
saved with `save_pretrained`, loaded by `load_model` (which runs the log-prob probe), and
unitune's log-probs, padded and packed, full and LoRA, equal to the model's own
`forward().logits -> log_softmax -> gather`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from architectures import ARCHITECTURES
from typer.testing import CliRunner

from unitune.cli import app
from unitune.models import head
from unitune.models.builtin import tiny_tokenizer
from unitune.models.config import LoraConfig, ModelConfig
from unitune.models.errors import ModelLoadError
from unitune.models.load import load_model
from unitune.models.logprobs import naive_sequence_logps, sequence_logps
from unitune.models.lora import is_peft
from unitune.models.probe import logprob_gap

_DIRS: dict[str, Path] = {}


def save_tiny(model_type: str, root: Path, **overrides) -> Path:
    """A random 2-layer `model_type` model and builtin:tiny's tokenizer, saved in `root`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    kwargs = {k: v for k, v in {**ARCHITECTURES[model_type], **overrides}.items() if v is not None}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **{"pad_token_id": tokenizer.pad_token_id, **kwargs},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    out = root / model_type
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")

    def get(model_type: str) -> Path:
        if model_type not in _DIRS:
            _DIRS[model_type] = save_tiny(model_type, root)
        return _DIRS[model_type]

    return get


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows of random tokens; targets from position 3 on."""
    g = torch.Generator().manual_seed(0)
    lengths = [11, 5, 8]
    ids = torch.randint(0, vocab, (3, max(lengths)), generator=g)
    am = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    tm = torch.ones_like(ids)
    tm[:, :3] = 0
    return ids, am, tm


def perturb_adapters(model) -> None:
    """LoRA's B starts at zero (the adapted model is the base): make the adapters count."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_logps_equal_the_models_own(model_type, lora, arch_dir):
    spec = ModelConfig(name=str(arch_dir(model_type)), lora=LoraConfig() if lora else None)
    model, tokenizer = load_model(spec)  # runs the probe
    assert is_peft(model) == lora
    if lora:
        perturb_adapters(model)
    model.eval()
    ids, am, tm = batch(len(tokenizer))
    with torch.no_grad():
        want, n_want = naive_sequence_logps(model, ids, am, tm)
        padded, n = sequence_logps(model, ids, am, tm, chunk_size=7)
        packed, n_packed = sequence_logps(model, ids, am, tm, chunk_size=7, packed=True)
    assert n.tolist() == n_want.tolist() == n_packed.tolist() == [8, 2, 5]
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["cohere", "granite", "gemma2"])
def test_without_the_post_head_transform_the_probe_refuses(model_type, arch_dir, monkeypatch):
    """What unitune did before the transform table: the head's output used as it is."""
    path = arch_dir(model_type)
    model, tokenizer = load_model(ModelConfig(name=str(path)))
    assert logprob_gap(model, tokenizer)[0] < 1e-5
    monkeypatch.delitem(head.POST_HEAD, model.config.model_type)
    assert logprob_gap(model, tokenizer)[0] > 1e-2
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(name=str(path)))
    message = str(err.value)
    assert "\n" not in message
    assert type(model).__name__ in message and "differ from the model's own forward" in message


def test_lora_targets_that_match_nothing_list_the_linear_layers(arch_dir):
    spec = ModelConfig(name=str(arch_dir("gpt_neox")), lora=LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    message = str(err.value)
    assert message.startswith("model.lora.target_modules: q_proj match no linear layer of")
    assert "query_key_value" in message and "dense_4h_to_h" in message and "\n" not in message
    assert "embed_out" not in message  # the LM head is not a LoRA target


def test_train_gpt_neox_with_default_lora_through_the_cli(arch_dir, tiny_config, tmp_path):
    raw = tiny_config("alright", max_steps=2, eval_every=2)
    raw["model"] = {"name": str(arch_dir("gpt_neox")), "lora": {}}
    path = tmp_path / "neox.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    adapter = json.loads((Path(raw["output_dir"]) / "model" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == {
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
    }
