"""Our objectives agree with TRL's implementations on identical inputs (values and gradients).

TRL 1.16 computes DPO/IPO and KTO inside `DPOTrainer._compute_loss` / `KTOTrainer._compute_loss`
(trl/trainer/dpo_trainer.py, trl/trainer/kto_trainer.py), which run the model themselves. We call
those real methods on an object built with `object.__new__` (no `__init__`), with the attributes
they read set by hand and a fake causal LM whose per-token log-prob of token `v` is `table[v]`
(zero on non-completion positions, as TRL's fused LM head returns). Our side gets the summed
log-probs of the same sequences from the same table, so the two sides see identical inputs and
gradients flow back to the same leaf tensor. Reference log-probs are given precomputed.

SimPO and ORPO are compared with `CPOTrainer.cpo_loss` (`loss_type="simpo"`) and
`ORPOTrainer.odds_ratio_loss` (trl/experimental/{cpo,orpo}), which take average log-probs directly.
ORPO's NLL term: TRL scores prompt *and* response tokens of the chosen sequence, whereas ours
(as the reference code with `disable_prompt_loss`, and by the library's rule that prompt tokens are
never scored) is the token-mean NLL over the chosen responses; we therefore give TRL's formula
`nll - odds_ratio_loss(...).mean()` that response-only NLL.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from unitune.objectives import REGISTRY, FeedbackLogps, PairLogps, SeqLogps  # noqa: E402

D = torch.float64
V = 50  # fake vocabulary
BETAS = (0.01, 0.1, 0.5, 2.0)


class FakeLM:
    """Per-token log-prob of token `v` is `table[v]`; 0 where the label is -100."""

    training = False

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, labels, **_):
        shifted = labels[:, 1:]
        logps = self.table[input_ids[:, 1:]] * (shifted != -100)
        zeros = torch.zeros(shifted.shape, dtype=D)
        return SimpleNamespace(
            log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def batch(g, b, length=16):
    """Right-padded sequences: prompt (mask 0), completion (mask 1), padding (attention 0)."""
    ids = torch.randint(0, V, (b, length), generator=g)
    attn = torch.zeros(b, length, dtype=torch.long)
    comp = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        p = int(torch.randint(1, 5, (1,), generator=g))
        c = int(torch.randint(1, length - p + 1, (1,), generator=g))
        attn[i, : p + c] = 1
        comp[i, p : p + c] = 1
    return ids, attn, comp


def summed(table, ids, comp):
    """Our side: summed completion log-probs and |y|, from the same table."""
    return (table[ids] * comp).sum(1), comp.sum(1)


def stub(cls, **attrs):
    obj = object.__new__(cls)
    common = dict(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
    )
    for k, v in {**common, **attrs}.items():
        setattr(obj, k, v)
    return obj


def leaf_table(g):
    return (-torch.rand(V, generator=g, dtype=D) * 3 - 0.01).requires_grad_(True)


def grad_of(loss, table):
    (g,) = torch.autograd.grad(loss, table)
    return g


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", BETAS)
def test_dpo_and_ipo_agree_with_trl_dpo_trainer(loss_type, beta):
    g = torch.Generator().manual_seed(int(beta * 100) + len(loss_type))
    b = 6
    table = leaf_table(g)
    ids, attn, comp = batch(g, 2 * b)  # rows 0..b-1 chosen, b..2b-1 rejected
    ref = -torch.rand(2 * b, generator=g, dtype=D) * 20
    trainer = stub(
        DPOTrainer,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
    )
    inputs = dict(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=comp,
        ref_chosen_logps=ref[:b],
        ref_rejected_logps=ref[b:],
    )
    trl_loss = trainer._compute_loss(FakeLM(table), inputs, return_outputs=False)
    trl_grad = grad_of(trl_loss, table)

    names = ["dpo", "una_pair"] if loss_type == "sigmoid" else ["ipo"]
    for name in names:
        logp, n = summed(table, ids, comp)
        lp = PairLogps(SeqLogps(logp[:b], n[:b], ref[:b]), SeqLogps(logp[b:], n[b:], ref[b:]))
        ours = REGISTRY[name].loss(lp, REGISTRY[name].params(beta=beta))
        torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_of(ours, table), trl_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_agrees_with_trl_kto_trainer(beta, weights):
    g = torch.Generator().manual_seed(int(beta * 100) + int(weights[0] * 10))
    b = 8
    table = leaf_table(g)
    ids, attn, comp = batch(g, b)
    kl_ids, kl_attn, kl_comp = batch(g, b)
    label = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)  # 5 vs 3
    ref = -torch.rand(b, generator=g, dtype=D) * 20
    kl_logp0 = summed(table, kl_ids, kl_comp)[0].detach()
    for ref_kl in (
        kl_logp0 - 0.3 - torch.rand(b, generator=g, dtype=D),  # KL estimate > 0
        kl_logp0 + 0.3 + torch.rand(b, generator=g, dtype=D),  # < 0: clamped to 0
    ):
        logp, n = summed(table, ids, comp)
        kl_logp, kl_n = summed(table, kl_ids, kl_comp)
        trainer = stub(
            KTOTrainer,
            beta=beta,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
            loss_type="kto",
            calculate_KL=True,
            precompute_ref_logps=True,
        )
        inputs = dict(
            input_ids=ids,
            attention_mask=attn,
            completion_mask=comp,
            KL_input_ids=kl_ids,
            KL_attention_mask=kl_attn,
            KL_completion_mask=kl_comp,
            label=label,
            ref_logps=ref,
            ref_KL_logps=ref_kl,
        )
        trl_loss = trainer._compute_loss(FakeLM(table), inputs, return_outputs=False)

        fb = FeedbackLogps(SeqLogps(logp, n, ref), label.to(D), kl=SeqLogps(kl_logp, kl_n, ref_kl))
        obj = REGISTRY["kto"]
        params = obj.params(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
        ours = obj.loss(fb, params)
        torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            grad_of(ours, table), grad_of(trl_loss, table), rtol=1e-8, atol=1e-12
        )


def avg_pairs(g, b):
    n_w = torch.randint(1, 40, (b,), generator=g)
    n_l = torch.randint(1, 40, (b,), generator=g)
    logp_w = -torch.rand(b, generator=g, dtype=D) * 3 * n_w
    logp_l = -torch.rand(b, generator=g, dtype=D) * 3 * n_l
    return PairLogps(SeqLogps(logp_w, n_w), SeqLogps(logp_l, n_l))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
def test_simpo_agrees_with_trl_cpo_trainer(beta, gamma):
    g = torch.Generator().manual_seed(int(beta * 100 + gamma * 10))
    lp = avg_pairs(g, 7)
    trainer = stub(CPOTrainer, beta=beta, loss_type="simpo", simpo_gamma=gamma, alpha=0.0)
    trainer.label_smoothing = 0.0
    # CPOTrainer feeds cpo_loss average log-probs for loss_type="simpo"
    losses, _, _ = trainer.cpo_loss(lp.chosen.avg_logp, lp.rejected.avg_logp)
    ours = REGISTRY["simpo"].loss(lp, REGISTRY["simpo"].params(beta=beta, gamma=gamma))
    torch.testing.assert_close(ours, losses.mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.05, 0.1, 0.5, 1.0])
def test_orpo_agrees_with_trl_orpo_trainer(lam):
    g = torch.Generator().manual_seed(int(lam * 100))
    lp = avg_pairs(g, 7)
    trainer = stub(ORPOTrainer, beta=lam)
    losses, *_ = trainer.odds_ratio_loss(lp.chosen.avg_logp, lp.rejected.avg_logp)
    nll = -lp.chosen.logp.sum() / lp.chosen.n_tokens.sum()  # response-only, see module docstring
    trl_total = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    ours = REGISTRY["orpo"].loss(lp, REGISTRY["orpo"].params(odds_ratio_weight=lam))
    # TRL's odds_ratio_loss upcasts to float32
    torch.testing.assert_close(ours, trl_total.to(D), rtol=1e-5, atol=1e-6)
    assert ours.item() - nll.item() > 1e-3  # the odds-ratio term is active
