import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model

from unitune.models.logprobs import sequence_logps
from unitune.objectives import REGISTRY, SeqLogps, TokenLogps
from unitune.objectives.ift import (
    discounted_suffix_sum,
    greedy_predictions,
    ift,
    ift_forward,
    propagation_weights,
)

V = 97


@pytest.fixture(scope="module")
def model():
    return tiny_llama(V)


def batch(seed=1):
    """Right padding, a masked prompt, a two-span response, targets over padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (4, 15), generator=g)
    am = torch.ones_like(ids)
    am[1, 10:] = 0
    am[2, 7:] = 0
    tm = torch.zeros_like(ids)
    tm[0, 5:] = 1
    tm[1, 3:] = 1  # 10+ padded: ignored
    tm[2, 4:7] = 1
    tm[3, 2:5] = 1
    tm[3, 9:13] = 1
    return ids, am, tm


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_registered():
    obj = REGISTRY["ift"]
    assert obj.slot == "sft" and obj.data == "demonstrations" and not obj.needs_ref
    assert obj.forward is ift_forward
    assert obj.defaults == {"embed_mix": 0.2, "gamma": 0.95, "detach_weights": False}


def test_lam0_gamma0_is_exactly_sft_value_and_gradients(model):
    """IFT(0, 0) = per-sequence token-mean NLL, averaged over sequences (the reference's SFT)."""
    ids, am, tm = batch()
    model.zero_grad()
    lp = ift_forward(model, ids, am, tm, embed_mix=0.0, chunk_size=5)
    got = ift(lp, embed_mix=0.0, gamma=0.0)
    got.backward()
    g_ift = grads(model)

    model.zero_grad()
    logp, n = sequence_logps(model, ids, am, tm, chunk_size=5)
    assert torch.equal(lp.n_tokens, n) and n.tolist() == [10, 7, 3, 7]
    want = (-logp / n).mean()
    want.backward()
    g_sft = grads(model)
    model.zero_grad()

    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert g_ift.keys() == g_sft.keys()
    for k in g_sft:
        torch.testing.assert_close(g_ift[k], g_sft[k], atol=1e-6, rtol=1e-5, msg=k)
    # per-token values sum to the per-sequence log-probs, and are 0 off the response
    torch.testing.assert_close(lp.logp.sum(1), logp, atol=1e-5, rtol=0)
    off = lp.mask == 0
    assert (lp.logp[off] == 0).all()
    assert lp.mask[:, 0].sum() == 0 and lp.mask[1, 10:].sum() == 0


def test_lam0_gamma0_differs_from_batch_token_mean_under_unequal_lengths(model):
    ids, am, tm = batch()
    with torch.no_grad():
        lp = ift_forward(model, ids, am, tm, embed_mix=0.0)
        logp, n = sequence_logps(model, ids, am, tm)
    batch_mean = REGISTRY["sft"].loss(SeqLogps(logp, n))
    assert not torch.allclose(ift(lp, embed_mix=0.0, gamma=0.0), batch_mean)


def test_weights_hand_computed_gamma_half():
    # row 0: response at positions 1..3 with l = 1, 2, 3 (T = 3)
    #   s = [1/3 + .5*(2/3) + .25*1, 2/3 + .5*1, 1] = [11/12, 14/12, 12/12], sum 37/12
    #   w = 3 * s / (37/12) = [33, 42, 36] / 37; loss_0 = (33 + 84 + 108) / 37 / 3 = 75/37
    # row 1: response at position 2 only (l = 4, T = 1): w = [1]; loss_1 = 4
    logp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, 0.0, -4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    w = propagation_weights(-logp * mask, mask, 0.5)
    want = torch.tensor([[0.0, 33 / 37, 42 / 37, 36 / 37], [0.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(w, want)
    loss = ift(TokenLogps(logp, mask), gamma=0.5)
    torch.testing.assert_close(loss, torch.tensor((75 / 37 + 4) / 2))
    # gamma = 0: uniform weights (not the gamma -> 0 limit, which is T * l_t / sum l)
    torch.testing.assert_close(propagation_weights(-logp * mask, mask, 0.0), mask.float())
    torch.testing.assert_close(ift(TokenLogps(logp, mask), gamma=0.0), torch.tensor((2 + 4) / 2))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.95, 1.0])
@pytest.mark.parametrize("length", [1, 7, 600])
def test_discounted_suffix_sum_matches_loop(gamma, length):
    x = torch.rand(3, length, dtype=torch.float64)
    want = torch.zeros_like(x)
    acc = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(length)):
        acc = x[:, t] + gamma * acc
        want[:, t] = acc
    torch.testing.assert_close(discounted_suffix_sum(x, gamma), want)


def test_rows_without_targets_are_left_out():
    logp = torch.tensor([[0.0, -1.0, -3.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    for gamma in (0.0, 0.9):
        loss = ift(TokenLogps(logp, mask), gamma=gamma)
        assert torch.isfinite(loss)
    torch.testing.assert_close(ift(TokenLogps(logp, mask), gamma=0.0), torch.tensor(2.0))


def test_detach_weights_changes_gradient_not_value():
    torch.manual_seed(0)
    raw = torch.randn(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    out = {}
    for detach in (False, True):
        logp = (-torch.nn.functional.softplus(raw)).requires_grad_(True)
        loss = ift(TokenLogps(logp * mask, mask), gamma=0.9, detach_weights=detach)
        loss.backward()
        out[detach] = (loss.detach(), logp.grad.clone())
    torch.testing.assert_close(out[False][0], out[True][0])
    assert not torch.allclose(out[False][1], out[True][1])
    assert (out[True][1][mask == 0] == 0).all() and (out[False][1][mask == 0] == 0).all()


def test_greedy_predictions_equal_naive_argmax(model):
    ids, am, tm = batch(2)
    scored = tm[:, 1:].bool() & am[:, 1:].bool()
    pos = scored.nonzero()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    got = greedy_predictions(decoder, head, ids, am, pos, chunk_size=4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    want = logits[:, :-1].argmax(-1)[scored]
    assert torch.equal(got, want)


def _capture_embeds(model, fn):
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")
        seen["ids"] = kwargs.get("input_ids")

    h = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        h.remove()
    return out, seen


def test_lam_positive_mixes_response_positions_only(model):
    ids, am, tm = batch(3)
    lam = 0.3
    lp, seen = _capture_embeds(model, lambda: ift_forward(model, ids, am, tm, embed_mix=lam))
    embeds = seen["embeds"]
    assert embeds is not None
    E = model.get_input_embeddings()
    with torch.no_grad():
        clean = E(ids)
        logits = model(input_ids=ids, attention_mask=am).logits
    scored = torch.zeros_like(tm, dtype=torch.bool)
    scored[:, 1:] = tm[:, 1:].bool() & am[:, 1:].bool()
    # prompt and padding positions: exactly E(x_t)
    assert torch.equal(embeds[~scored], clean[~scored])
    # response position t: (1 - lam) * E(y_t) + lam * E(argmax logits_{t-1})
    preds = torch.zeros_like(ids)
    preds[:, 1:] = logits[:, :-1].argmax(-1)
    want = (1 - lam) * clean + lam * E(preds)
    torch.testing.assert_close(embeds[scored], want[scored].detach())
    assert (preds[scored] != ids[scored]).any()  # a random model: some guesses are wrong

    sft_lp = ift_forward(model, ids, am, tm, embed_mix=0.0)
    assert torch.equal(lp.mask, sft_lp.mask)
    diff = (lp.logp - sft_lp.logp).abs()
    assert diff.max() > 1e-4
    # the first response token of each span after the prompt has a clean prefix: same as SFT
    assert diff[0, 5] < 1e-5 and diff[3, 2] < 1e-5
    # and the loss is differentiable to the embeddings
    ift(lp, embed_mix=lam).backward()
    assert E.weight.grad is not None and E.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_lam0_skips_the_greedy_pass(model):
    ids, am, tm = batch(4)
    calls = []
    h = model.get_decoder().register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad():
            ift_forward(model, ids, am, tm, embed_mix=0.0)
            assert len(calls) == 1
            ift_forward(model, ids, am, tm, embed_mix=0.2)
            assert len(calls) == 3
    finally:
        h.remove()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft probes a deprecated attribute
def test_works_through_peft(model):
    ids, am, tm = batch(5)
    lora = get_peft_model(tiny_llama(V, 1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:  # non-zero adapters, so that LoRA matters
            torch.nn.init.normal_(p, std=0.1)
    lp = ift_forward(lora, ids, am, tm, embed_mix=0.2, gamma=0.95, detach_weights=False)
    loss = ift(lp, embed_mix=0.2, gamma=0.95)
    loss.backward()
    trained = [p for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    # lam = 0, gamma = 0 through peft is still SFT
    with torch.no_grad():
        lp0 = ift_forward(lora, ids, am, tm, embed_mix=0.0)
        logp, n = sequence_logps(lora, ids, am, tm)
    torch.testing.assert_close(ift(lp0, embed_mix=0.0, gamma=0.0), (-logp / n).mean())


def test_registry_loss_and_validation():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    mask = torch.tensor([[0, 1, 1]])
    obj = REGISTRY["ift"]
    params = obj.params(embed_mix=0.0, gamma=0.0)
    torch.testing.assert_close(obj.loss(TokenLogps(logp, mask), params), torch.tensor(1.5))
    with pytest.raises(ValueError, match="gamma"):
        ift(TokenLogps(logp, mask), gamma=1.5)
    with pytest.raises(ValueError, match="embed_mix"):
        ift(TokenLogps(logp, mask), embed_mix=-0.1)
    with pytest.raises(Exception):  # noqa: B017 - unknown keys are config errors
        obj.params(beta=1.0)


def test_builtin_tiny_model_runs():
    from unitune.data import Sequence, collate
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model

    model, tok = load_model(ModelConfig(name="builtin:tiny"))
    seqs = [
        Sequence(input_ids=(5, 6, 7, 8, 9), target_mask=(0, 0, 1, 1, 1)),
        Sequence(input_ids=(5, 6, 7), target_mask=(0, 1, 1)),
    ]
    b = collate(seqs, tok.pad_token_id)
    lp = ift_forward(model, **b, embed_mix=0.2)
    loss = ift(lp)
    assert torch.isfinite(loss)
    loss.backward()
