"""unitune's decode loop (models/decode.py) against Hugging Face `generate` on every architecture
unitune claims: the same tokens, greedy and sampled with the same seed; its log-probs equal the
model's own forward; and the generation copy (models/generation_copy.py): packed weights give
the plain model's logits, LoRA merged, refreshed from the policy."""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES
from conftest import perturbed_tiny
from test_architectures import perturb_adapters, save_tiny

from unitune.eval.generate import left_pad
from unitune.models.decode import decode, draw, warp
from unitune.models.generation_copy import GenerationCopy, PackedLinear
from unitune.training.rollout import sample

OPTIONS = {
    "greedy": {"do_sample": False},
    "top_p": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
    "top_k": {"do_sample": True, "temperature": 1.3, "top_p": 1.0, "top_k": 20},
}


def _chat(tok, text):
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _hf(model, ids, mask, eos, pad, n, opts):
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, use_cache=True,
        **({"top_k": 0} | opts),
    )  # fmt: skip
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[
        :, ids.shape[1] :
    ]


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decode_arch")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            path = save_tiny(model_type, root)
            cache[model_type] = AutoModelForCausalLM.from_pretrained(path).eval()
        return cache[model_type]

    return get


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_decode_draws_hf_generates_tokens(model_type, option, arch_models):
    """Left-padded rows of different lengths, two EOS ids, some rows ending early: token for
    token HF `generate`'s output, with the same seed when sampling."""
    model = arch_models(model_type)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    ids, mask = left_pad(rows, 0, torch.device("cpu"))
    eos, opts = [5, 17], OPTIONS[option]
    torch.manual_seed(3)
    want = _hf(model, ids, mask, eos, 0, 12, opts)
    torch.manual_seed(3)
    got = decode(model, ids, mask, max_new_tokens=12, eos=eos, pad_id=0, **opts).tokens
    assert torch.equal(got, want)


def test_rows_end_at_eos_and_get_padding_after():
    model, tok = perturbed_tiny()
    model.eval()
    rows = [_chat(tok, c) for c in ("Hi", "Name three colours.", "Count.")]
    ids, mask = left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    out = decode(model, ids, mask, max_new_tokens=30, eos=[tok.eos_token_id], pad_id=-1,
                 do_sample=True, temperature=1.5)  # fmt: skip
    for row in out.tokens.tolist():
        if tok.eos_token_id in row:
            end = row.index(tok.eos_token_id)
            assert all(t == -1 for t in row[end + 1 :])
    # it stops when every row has ended: no column of padding only
    assert not (out.tokens[:, -1] == -1).all()


def test_warp_matches_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    want = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.6)(
        None, scores)))  # fmt: skip
    assert torch.equal(warp(scores, 0.6, 10, 0.8), want)
    assert torch.equal(warp(scores, 1.0, 0, 1.0), scores)


def test_decode_logps_are_the_models_own_at_the_temperature():
    model, tok = perturbed_tiny()
    model.eval()
    rows = [_chat(tok, "Tell a story.")] * 2
    ids, mask = left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    out = decode(model, ids, mask, max_new_tokens=6, eos=[], pad_id=0, do_sample=True,
                 temperature=0.8, logps=True)  # fmt: skip
    full = torch.cat([ids, out.tokens], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full).logits.float() / 0.8
    want = logits.log_softmax(-1)[:, ids.shape[1] - 1 : -1].gather(-1, out.tokens[..., None])
    torch.testing.assert_close(out.logp, want[..., 0], rtol=1e-5, atol=1e-5)


def test_sample_with_decode_equals_sample_with_hf_generate():
    model, tok = perturbed_tiny()
    model.eval()
    prompts = [_chat(tok, f"Animal {i}?") for i in range(3)]
    kw = dict(num_generations=2, eos=[tok.eos_token_id], pad_id=tok.pad_token_id,
              max_new_tokens=10, temperature=0.9, top_p=0.95, seed=4)  # fmt: skip
    a = sample(model, prompts, sampler="multinomial", **kw)
    b = sample(model, prompts, generator="hf", **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.sample_logp, b.sample_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_copy_gives_the_plain_models_logits(dtype):
    """Packed weights (oneDNN / MKL, where this torch has them) compute what the plain copy in
    the same dtype computes; prefill and one-row steps alike."""
    model, _ = perturbed_tiny()
    model.eval()
    packed = GenerationCopy(model, dtype).module
    plain = GenerationCopy(model, dtype, pack=False).module
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = packed(input_ids=ids).logits.float()
        b = plain(input_ids=ids).logits.float()
        a1 = packed(input_ids=ids[:1, :1]).logits.float()
        b1 = plain(input_ids=ids[:1, :1]).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(a1, b1, rtol=tol, atol=tol)


def test_copy_refresh_follows_the_policy_and_merges_lora(tmp_path):
    from unitune.models.config import LoraConfig, ModelConfig
    from unitune.models.load import load_model

    path = save_tiny("llama", tmp_path)
    model, _ = load_model(ModelConfig(name=str(path), lora=LoraConfig()))
    perturb_adapters(model)
    model.eval()
    copy = GenerationCopy(model, torch.float32)
    if copy.kind is not None:
        assert any(isinstance(m, PackedLinear) for m in copy.module.modules())
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))

    def close(a_model, b_model):
        with torch.inference_mode():
            a = a_model(input_ids=ids).logits
            b = b_model(input_ids=ids).logits
        return torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    assert close(copy.module, model)
    with torch.no_grad():  # the policy moves on: an optimizer step on the adapters and the head
        for name, p in model.named_parameters():
            if "lora_A" in name or "norm" in name:
                p.add_(0.1)
    assert not close(copy.module, model)
    copy.refresh(model)
    assert close(copy.module, model)
    with model.disable_adapter():  # adapters off: the copy follows the base
        copy.refresh(model)
        assert close(copy.module, model)
    if copy.kind is not None:  # released: the packed weights freed, refreshed: back
        copy.release()
        with pytest.raises(RuntimeError, match="released"):
            copy.module(input_ids=ids)
        copy.refresh(model)
        assert close(copy.module, model)


def test_inverse_cdf_draws_the_distribution():
    """The inverse-CDF draw follows the probabilities (a chi-square test over 40,000 draws of
    each of three rows, one with zeros: top-k / top-p leave those), never draws a token of
    probability 0, and is a function of the seed."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 12, generator=g) * 1.5, dim=-1)
    probs[2, ::3] = 0.0
    probs[2] /= probs[2].sum()
    n = 40_000
    torch.manual_seed(1)
    drawn = torch.stack([draw(probs, "inverse_cdf") for _ in range(n)], dim=1)  # [3, n]
    for row in range(3):
        counts = torch.bincount(drawn[row], minlength=12).double()
        expected = probs[row].double() * n
        seen = expected > 0
        assert counts[~seen].sum() == 0  # no token of probability 0
        chi2 = float((((counts - expected) ** 2)[seen] / expected[seen]).sum())
        assert chi2 < 35.0, (row, chi2)  # 11 degrees of freedom: p < 0.0003 above 35
    torch.manual_seed(1)
    again = torch.stack([draw(probs, "inverse_cdf") for _ in range(10)], dim=1)
    assert torch.equal(again, drawn[:, :10])
    # the same test catches a biased draw: every probability shifted towards the first token
    biased = torch.softmax(torch.log(probs[0]) + torch.linspace(0.3, 0, 12), dim=-1)
    torch.manual_seed(1)
    off = torch.stack([draw(biased[None], "inverse_cdf")[0] for _ in range(n)])
    counts = torch.bincount(off, minlength=12).double()
    chi2 = float(((counts - probs[0].double() * n) ** 2 / (probs[0].double() * n)).sum())
    assert chi2 > 35.0


def test_inverse_cdf_rollouts_keep_the_logprob_bookkeeping():
    """Rollouts drawn with either sampler from the same model: a different stream of tokens for
    the same seed, the same log-prob bookkeeping (the training pass's equal the sampler's)."""
    from unitune.models.logprobs import completion_logps

    model, tok = perturbed_tiny()
    model.eval()
    prompts = [_chat(tok, f"Animal {i}?") for i in range(3)]
    kw = dict(num_generations=2, eos=[tok.eos_token_id], pad_id=tok.pad_token_id,
              max_new_tokens=10, temperature=0.9, seed=4)  # fmt: skip
    a = sample(model, prompts, sampler="inverse_cdf", **kw)
    b = sample(model, prompts, sampler="multinomial", **kw)
    assert not torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        train = completion_logps(model, a.input_ids, a.attention_mask, a.starts,
                                 a.mask.shape[1], temperature=0.9) * a.mask  # fmt: skip
    assert ((train - a.sample_logp).abs() * a.mask).max() < 1e-4
