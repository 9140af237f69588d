"""`train.packing`: padding-free log-probs (`logprobs.packed_sequence_logps`). The rows of a batch
go through the decoder as one row with restarting position ids; sums, counts and gradients are the
padded pass's, and a training run is the same run."""

import importlib
from pathlib import Path

import pytest
import torch
import transformers.masking_utils as masking_utils
import yaml
from conftest import run_records, tiny_llama
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import AttentionInterface
from typer.testing import CliRunner

from unitune.cli import app
from unitune.models import logprobs
from unitune.models.load import enable_gradient_checkpointing
from unitune.models.logprobs import naive_sequence_logps, pack, sequence_logps

VOCAB = 311
LENGTHS = [3, 61, 1, 17, 2, 40, 9]  # very different lengths, one of a single token


def batch(lengths=LENGTHS, seed=0):
    """A right-padded batch; targets from position 2 on, plus a gap in the long rows."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
    am = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    tm = torch.ones_like(ids)
    tm[:, :2] = 0
    tm[:, 20:25] = 0
    return ids, am, tm


def model_with(impl: str, seed: int = 0):
    model = tiny_llama(VOCAB, seed)
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_padded(impl):
    model = model_with(impl)
    ids, am, tm = batch()
    want, n_want = sequence_logps(model, ids, am, tm, chunk_size=16)
    got, n = sequence_logps(model, ids, am, tm, chunk_size=16, packed=True)
    assert got.dtype == torch.float32 and got.shape == (len(LENGTHS),)
    assert torch.equal(n, n_want)
    assert n.tolist() == [1, 54, 0, 15, 0, 33, 7]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and both are the full-logits reference
    ref, _ = naive_sequence_logps(model, ids, am, tm)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def lora_model(impl):
    return get_peft_model(
        model_with(impl),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )


def checkpointed_model(impl):
    model = model_with(impl)
    enable_gradient_checkpointing(model)
    return model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [model_with, lora_model, checkpointed_model])
def test_packed_gradients_equal_padded(impl, build):
    model = build(impl)
    model.train()
    ids, am, tm = batch(seed=1)

    def grads(packed: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        logp, n = sequence_logps(model, ids, am, tm, chunk_size=16, packed=packed)
        (logp / n.clamp(min=1)).sum().backward()  # every row weighs in differently
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    padded, packed = grads(False), grads(True)
    assert padded.keys() == packed.keys() and padded
    for k in padded:
        assert padded[k].abs().sum() > 0, k
        torch.testing.assert_close(packed[k], padded[k], rtol=1e-5, atol=1e-5, msg=k)


def test_the_decoder_sees_one_padding_free_row_and_a_block_diagonal_mask():
    model = model_with("sdpa")
    ids, am, tm = batch()
    seen, masks = [], []
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    sequence_logps(model, ids, am, tm, packed=True)
    (kw,) = seen
    total = sum(LENGTHS)
    assert kw["input_ids"].shape == (1, total) and kw["attention_mask"] is None
    assert torch.equal(kw["input_ids"][0], ids[am.bool()])
    starts = torch.tensor([0, *LENGTHS]).cumsum(0)[:-1]
    want_pos = torch.cat([torch.arange(n) for n in LENGTHS])
    assert torch.equal(kw["position_ids"][0], want_pos)
    assert (kw["position_ids"][0, starts] == 0).all()
    # the mask the attention got: causal inside each sequence, nothing across sequences
    (mask,) = masks
    assert mask.shape == (1, 1, total, total)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    i = torch.arange(total)
    block_causal = (seq[:, None] == seq[None, :]) & (i[None, :] <= i[:, None])
    assert torch.equal(mask[0, 0].bool(), block_causal)


def test_ignored_packing_would_be_caught(monkeypatch):
    """If transformers did not detect the packed sequences (one causal mask over the whole row,
    as with the default use_cache=True), or positions did not restart, the packed log-probs would
    be far from the padded ones: the equality tests above can fail."""
    model = model_with("sdpa")
    ids, am, tm = batch()
    with torch.no_grad():
        padded, _ = sequence_logps(model, ids, am, tm)
        with monkeypatch.context() as m:
            m.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
            no_block_mask, _ = sequence_logps(model, ids, am, tm, packed=True)

        def no_restart(input_ids, attention_mask):
            p = pack(input_ids, attention_mask)
            return {**p, "position_ids": torch.arange(p["input_ids"].shape[1])[None]}

        with monkeypatch.context() as m:
            m.setattr(logprobs, "pack", no_restart)
            no_restart_pos, _ = sequence_logps(model, ids, am, tm, packed=True)
    # rows after the first one see earlier sequences: far off (the first row is unaffected)
    for wrong in (no_block_mask, no_restart_pos):
        torch.testing.assert_close(wrong[0], padded[0], rtol=1e-5, atol=1e-5)
        assert (wrong[1:] - padded[1:]).abs().max() > 1e-2


class FakeFlashAttn:
    """A CPU stand-in for the `flash_attn` package (not installed here): `flash_attn_varlen_func`
    as sdpa over each segment of `cu_seqlens`; records its calls."""

    def __init__(self):
        self.calls = []

    def varlen(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
        softmax_scale=None, causal=False,
    ):  # fmt: skip
        self.calls.append({"cu": cu_seqlens_q, "cu_k": cu_seqlens_k, "max": max_seqlen_q})
        assert causal and dropout_p == 0.0 and q.dim() == 3  # [tokens, heads, head_dim]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        bounds = cu_seqlens_q.tolist()
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    *(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
                    is_causal=True, scale=softmax_scale,
                )[0].transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )  # fmt: skip

    def dense(self, *args, **kwargs):
        raise AssertionError("the packed pass must use the varlen kernel")


def test_flash_attention_2_gets_the_varlen_kwargs(monkeypatch):
    """transformers' own FlashAttention-2 path (`flash_attention_forward` ->
    `_flash_attention_forward`) on a stand-in kernel: the packed pass reaches
    `flash_attn_varlen_func` with the cumulative lengths computed once here (an int max length;
    transformers' fallback from the position ids would pass a tensor), with the padded numbers."""
    fake = FakeFlashAttn()
    fa = importlib.import_module("transformers.modeling_flash_attention_utils")
    monkeypatch.setattr(
        fa, "_lazy_imports",
        lambda *a, **k: (fake.dense, fake.varlen, None, fa._pad_input, fa._unpad_input),
    )  # fmt: skip
    monkeypatch.setattr(fa, "_loaded_implementation", None)  # load the stand-in, not a cached one
    model = model_with("sdpa")
    ids, am, tm = batch()
    want, _ = sequence_logps(model, ids, am, tm)
    model.config._attn_implementation = "flash_attention_2"  # as set_attn_implementation would
    assert model.model.config._attn_implementation == "flash_attention_2"
    got, _ = sequence_logps(model, ids, am, tm, packed=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    assert len(fake.calls) == model.config.num_hidden_layers
    for call in fake.calls:
        assert torch.equal(call["cu"], cu) and call["cu_k"] is call["cu"]
        assert call["max"] == max(LENGTHS) and isinstance(call["max"], int)


def test_unsupported_attention_and_left_padding_are_refused():
    AttentionInterface.register("unitune_test_other", lambda *a, **k: None)
    model = tiny_llama(VOCAB)
    model.set_attn_implementation("unitune_test_other")
    ids, am, tm = batch()
    with pytest.raises(ValueError, match="'unitune_test_other' cannot run packed"):
        sequence_logps(model, ids, am, tm, packed=True)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="right-padded"):
        sequence_logps(model, ids, am.flip(1), tm, packed=True)


def test_empty_rows_and_a_single_row():
    model = model_with("sdpa")
    ids, am, tm = batch([5, 1, 12])
    am[1] = 0  # an empty row
    want, n_want = sequence_logps(model, ids, am, tm)
    got, n = sequence_logps(model, ids, am, tm, packed=True)
    assert torch.equal(n, n_want) and got[1] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one, _ = sequence_logps(model, ids[2:], am[2:], tm[2:], packed=True)
    torch.testing.assert_close(one, want[2:], rtol=1e-5, atol=1e-5)
    assert pack(ids, am)["cu_seq_lens"].tolist() == [0, 5, 17]


def cli_run(tiny_config, tmp_path, monkeypatch, name: str, *extra: str) -> tuple[list, int]:
    """A `unitune train` run's metrics records, and how many packed passes it made."""
    raw = tiny_config("alright")  # SFT and DPO steps: chosen and rejected in one packed row
    raw["output_dir"] = str(tmp_path / name)
    raw["cache_dir"] = str(tmp_path / f"cache-{name}")  # its own reference log-probs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    calls = []
    real = logprobs.packed_sequence_logps
    with monkeypatch.context() as m:
        m.setattr(
            logprobs, "packed_sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
        res = CliRunner().invoke(app, ["train", str(path), "--no-progress", *extra])
    assert res.exit_code == 0, res.output
    return run_records(Path(raw["output_dir"])), len(calls)


def test_training_with_packing_is_the_same_run(tiny_config, tmp_path, monkeypatch):
    padded, n_padded = cli_run(tiny_config, tmp_path, monkeypatch, "padded")
    packed, n_packed = cli_run(
        tiny_config, tmp_path, monkeypatch, "packed", "--set", "train.packing=true"
    )
    # references, 4 steps and 3 evaluations: every log-prob pass packed, or none
    assert n_padded == 0 and n_packed >= 10
    assert [r["type"] for r in packed] == [r["type"] for r in padded]
    trains = [r for r in padded if r["type"] == "train"]
    assert {r["objective"] for r in trains} == {"sft", "pref"} and len(trains) == 4
    for a, b in zip(padded, packed, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
            else:
                assert b[k] == a[k], (a["step"], k)


def test_with_dropout_in_the_config_packed_and_padded_runs_end_with_equal_weights(
    tiny_config, tmp_path, monkeypatch
):
    """GPT-2 (dropout 0.1 in its config): `model.disable_dropout` (the default) turns it off, so
    the two runs draw no dropout masks and train the same weights."""
    from safetensors.torch import load_file
    from test_architectures import save_tiny

    model_dir = save_tiny("gpt2", tmp_path)
    config = tiny_config

    def gpt2_config(*args, **kwargs):
        raw = config(*args, **kwargs)
        raw["model"] = {"name": str(model_dir)}
        return raw

    weights = []
    for name, extra in (("padded", ()), ("packed", ("--set", "train.packing=true"))):
        cli_run(gpt2_config, tmp_path, monkeypatch, name, *extra)
        weights.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
    padded, packed = weights
    assert padded.keys() == packed.keys()
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5)


def test_a_model_that_does_not_keep_packed_sequences_apart_is_refused_at_start(
    tiny_config, tmp_path, monkeypatch
):
    """Seen on a GPU with transformers 5.17: Falcon's packed pass let sequences attend to each
    other (0.02 nats per token off) while its padded pass was exact. With `train.packing`, the
    load-time probe also runs the packed path on two sequences and refuses such a model in one
    line, before any data is read; the padded run of the same model is unaffected."""
    from unitune.models.builtin import tiny_tokenizer
    from unitune.models.errors import ModelLoadError
    from unitune.models.probe import check_logprobs

    model, tokenizer = model_with("sdpa"), tiny_tokenizer()
    check_logprobs(model, tokenizer, packed=True)  # transformers keeps them apart: passes
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    check_logprobs(model, tokenizer)  # the padded path does not depend on it
    with pytest.raises(ModelLoadError, match="train.packing") as err:
        check_logprobs(model, tokenizer, packed=True)
    assert "\n" not in str(err.value)

    raw = tiny_config("alright")
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(
        app, ["train", str(path), "--no-progress", "--set", "train.packing=true"]
    )
    assert res.exit_code != 0
    assert "do not keep packed sequences apart" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
