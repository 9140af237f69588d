"""Rollouts (training/rollout.py) and the per-token log-probs the online losses read
(models/logprobs.completion_logps): the bugs other online trainers shipped, each a test."""

import math

import pytest
import torch
from conftest import perturbed_tiny

from unitune.models.logprobs import completion_logps
from unitune.training.rollout import cut_at_eos, sample


def test_cut_at_first_eos_of_several_ids_and_truncation():
    """The completion ends at its first EOS, whichever of several EOS ids (Phi-3.5's false
    truncation rate: TRL PR #7039); a row with none that ran to max_new_tokens is truncated."""
    new = torch.tensor(
        [
            [5, 6, 2, 7, 2],  # EOS id 2 at position 2
            [5, 9, 6, 6, 6],  # the second EOS id (9) at position 1
            [5, 6, 7, 8, 4],  # none: truncated
            [2, 2, 2, 2, 2],  # EOS first: a one-token completion
        ]
    )
    mask, truncated = cut_at_eos(new, [2, 9], max_new_tokens=5)
    assert mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert truncated.tolist() == [False, False, True, False]
    # one EOS id only: row 1 runs on and is truncated (the defect several EOS ids avoid)
    _, only_first = cut_at_eos(new, [2], max_new_tokens=5)
    assert only_first.tolist() == [False, True, True, False]


def test_pad_equal_to_eos_does_not_hide_the_end():
    """pad == EOS (TRL PR #4970): the mask comes from the first EOS, not from the pad id, so
    the EOS itself is trained on and the padding after it is not."""
    eos = 0
    new = torch.tensor([[4, 5, eos, eos, eos], [4, 5, 6, 7, 8]])
    mask, truncated = cut_at_eos(new, [eos], max_new_tokens=5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


@pytest.fixture(scope="module")
def tiny():
    model, tok = perturbed_tiny()
    return model.eval(), tok


def _prompts(tok, n=2):
    msgs = [[{"role": "user", "content": f"Describe animal number {i}."}] for i in range(n)]
    return [tok.apply_chat_template(m, add_generation_prompt=True) for m in msgs]


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_training_pass_equals_the_samplers_logprobs_at_the_temperature(tiny, temperature):
    """The training pass's per-token log-probs (`completion_logps` at T) equal the sampler's own
    (`log softmax(logits / T)` of the drawn tokens): no stale policy, and log-probs divided by
    the temperature (TRL PR #3029). At another temperature they differ."""
    model, tok = tiny
    prompts = [list(_ids(p)) for p in _prompts(tok, 3)]
    r = sample(
        model, prompts, num_generations=2, eos=[tok.eos_token_id], pad_id=tok.pad_token_id,
        max_new_tokens=12, temperature=temperature, seed=3,
    )  # fmt: skip
    assert r.input_ids.shape[0] == 6
    with torch.no_grad():
        train = completion_logps(
            model, r.input_ids, r.attention_mask, r.starts, r.mask.shape[1],
            temperature=temperature,
        ) * r.mask  # fmt: skip
        other = completion_logps(
            model, r.input_ids, r.attention_mask, r.starts, r.mask.shape[1],
            temperature=temperature * 2,
        ) * r.mask  # fmt: skip
    gap = ((train - r.sample_logp).abs() * r.mask).max()
    assert gap < 1e-4, gap
    assert ((other - r.sample_logp).abs() * r.mask).max() > 1e-2


def test_completion_logps_equal_the_models_own_forward(tiny):
    """Per-token log-probs at T equal log_softmax(model(...).logits / T) at the same tokens."""
    model, tok = tiny
    prompts = [list(_ids(p)) for p in _prompts(tok, 2)]
    r = sample(
        model, prompts, num_generations=2, eos=[tok.eos_token_id], pad_id=tok.pad_token_id,
        max_new_tokens=8, temperature=0.8, seed=0,
    )  # fmt: skip
    with torch.no_grad():
        ours = completion_logps(
            model, r.input_ids, r.attention_mask, r.starts, r.mask.shape[1], temperature=0.8
        )
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits.float()
    logp = torch.log_softmax(logits / 0.8, dim=-1)
    for b in range(r.input_ids.shape[0]):
        for t in range(int(r.mask[b].sum())):
            pos = int(r.starts[b]) + t
            want = logp[b, pos - 1, r.input_ids[b, pos]]
            assert math.isclose(float(ours[b, t]), float(want), abs_tol=1e-5)


def test_sampling_is_a_function_of_the_seed_and_leaves_the_rng_alone(tiny):
    model, tok = tiny
    prompts = [list(_ids(p)) for p in _prompts(tok, 2)]
    kw = dict(num_generations=3, eos=[tok.eos_token_id], pad_id=tok.pad_token_id, max_new_tokens=10)
    before = torch.get_rng_state()
    a = sample(model, prompts, seed=11, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    b = sample(model, prompts, seed=11, **kw)
    c = sample(model, prompts, seed=12, **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.input_ids, c.input_ids)
    # the G samples of one prompt differ from each other (sampled, not repeated)
    assert len({tuple(x) for x in a.completion_ids[:3]}) > 1


def test_nothing_after_eos_is_in_the_training_rows(tiny):
    """The rows the loss reads end at the completion's EOS (TRL PR #2708): no token after it is
    attended or marked."""
    model, tok = tiny
    prompts = [list(_ids(p)) for p in _prompts(tok, 4)]
    r = sample(
        model, prompts, num_generations=2, eos=[tok.eos_token_id], pad_id=tok.pad_token_id,
        max_new_tokens=24, temperature=1.5, seed=5,
    )  # fmt: skip
    for b, c in enumerate(r.completion_ids):
        assert int(r.attention_mask[b].sum()) == int(r.starts[b]) + len(c)
        if tok.eos_token_id in c:
            assert c.index(tok.eos_token_id) == len(c) - 1  # the EOS is the last target
            assert not r.truncated[b]
