import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from unitune.models.logprobs import naive_sequence_logps, sequence_logps


@pytest.fixture(scope="module")
def model():
    return tiny_llama(311)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 311, (4, 17), generator=g)
    am = torch.ones_like(ids)
    am[1, 11:] = 0  # right padding
    am[2, 6:] = 0
    tm = torch.zeros_like(ids)
    tm[0, 5:] = 1
    tm[1, 3:] = 1  # includes padded positions: must be ignored
    tm[2, 2:4] = 1
    tm[3, 1:2] = 1
    tm[3, 9:15] = 1  # two separate response spans
    return ids, am, tm


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_chunked_equals_naive_under_padding_and_masking(model, chunk):
    ids, am, tm = batch()
    got, n = sequence_logps(model, ids, am, tm, chunk_size=chunk)
    want, n_want = naive_sequence_logps(model, ids, am, tm)
    assert torch.equal(n, n_want)
    assert n.tolist() == [12, 8, 2, 7]  # row 1: positions 3..10 (11+ padded)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_chunked_gradients_equal_naive(model):
    ids, am, tm = batch(2)
    model.zero_grad()
    sequence_logps(model, ids, am, tm, chunk_size=5)[0].sum().backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    naive_sequence_logps(model, ids, am, tm)[0].sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)
    model.zero_grad()


def test_padding_does_not_change_a_row(model):
    ids, am, tm = batch(3)
    full, _ = sequence_logps(model, ids, am, tm)
    alone, _ = sequence_logps(model, ids[2:3, :6], am[2:3, :6], tm[2:3, :6])
    torch.testing.assert_close(full[2:3], alone, atol=1e-5, rtol=0)


def test_works_through_peft(model):
    ids, am, tm = batch(4)
    lora = get_peft_model(
        LlamaForCausalLM(model.config), LoraConfig(r=2, target_modules=["q_proj"])
    )
    got, _ = sequence_logps(lora, ids, am, tm, chunk_size=3)
    want, _ = naive_sequence_logps(lora, ids, am, tm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
