"""Intuitive Fine-Tuning (IFT, arXiv 2405.11870): temporal residual + relation propagation.

Reference code: TsinghuaC3I/Intuitive-Fine-Tuning, `src/trainers.py` (commit 03adb93):
`BasicTrainer.get_batch_metrics` (the `loss_config.name == 'ift'` branch) builds the two passes,
`BasicTrainer.get_cumsum_weight` the token weights; defaults from `config/loss/ift.yaml`
(`min_lambda = max_lambda = 0.2`, `gamma = 0.95`, `propagation_type: loss`,
`propagation_side: left`, `propagation_norm: L1`). This file is written from that reading, not
copied.

Model passes (`ift_forward`). Token `t` with `target_mask[t] == 1` (and not padding) is a response
token `y_t`, scored from the hidden state at `t - 1`, as everywhere in unitune.

1. Pass 1, no grad, on the ground-truth sequence: the greedy prediction for each response
   position, `p_t = argmax_v logits_{t-1}[v]`. The LM head is applied only at the positions that
   predict a response token, in chunks, so the `[B, L, V]` logits are never built. (The reference
   takes the argmax of the full logits and shifts it right by one —
   `cat(input_ids[:, :1], argmax(logits)[:, :-1])` — then keeps it only where `labels != -100`:
   the same `p_t`.)
2. Pass 2, with grad: the input embedding at each response position `t` becomes
   `(1 - embed_mix) * E(y_t) + embed_mix * E(p_t)` (`embed_mix` is the paper's lambda), i.e. the
   embedding of the ground-truth input token mixed with the model's own guess for that position
   made from `t - 1`; prompt and padding positions keep exactly `E(x_t)` (in the reference they
   are `(1-embed_mix)*E(x_t) + embed_mix*E(x_t)`, equal up to rounding).
   The decoder runs on these `inputs_embeds` and the ground-truth labels are scored:
   `l_t = -log p(y_t | mixed prefix)`.
   With `embed_mix == 0` pass 1 is skipped and pass 2 runs on `input_ids`: exactly the SFT forward.
   Both passes run in the model's current mode (train mode: dropout in pass 1 too, as in the
   reference). The reference's optional `embed_mix` schedule and noise (`lambda_schedule`,
   `lambda_disturb`; off in its config) are not implemented: `embed_mix` is a constant.
   Both passes run on the padded batch, also with `train.packing` (which packs only the plain
   log-prob passes, `logprobs.sequence_logps`).

   [choice] `E` is the model's live input-embedding module (`model.get_input_embeddings()`), so the
   embedding matrix gets gradients through both `E(y_t)` and `E(p_t)`. The reference instead embeds
   with a frozen copy of the table (`self.embed_tokens`, `requires_grad_(False)`, re-synced after
   every optimizer step), so there the input embeddings get no gradient from the input side. Ours
   keeps `embed_mix = 0` identical to SFT in the gradients too.

Loss (`ift`), per sequence with `T` = its number of response tokens (reference: `propagation_type
'loss'`, `propagation_side 'left'` — which calls `discounted_cumsum_right`, the suffix sum
`y_i = x_i + gamma * y_{i+1}` — and `propagation_norm 'L1'`, the identity):

    s_t = sum_{k >= t} gamma^(k - t) * l_k / T          (response positions; 0 elsewhere)
    w_t = T * s_t / sum_j s_j                           (rescaled so that sum_t w_t = T)
    loss_seq = sum_t l_t * w_t / T
    loss = mean of loss_seq over the sequences of the batch (rows with T = 0 are left out)

The `1/T` inside `s_t` cancels in the rescaling; `k - t` counts positions, so a gap inside a
response (two spans) discounts by its length, as the reference's per-position cumsum does.

`gamma == 0` is a special case, not the limit of the formula: read literally, `gamma -> 0` gives
`w_t = T * l_t / sum_j l_j`, which up-weights hard tokens and is *not* SFT. The reference returns
uniform weights for `gamma == 0` (`if gamma == 0: return torch.ones_like(logps)`), so `w_t = 1`
and `loss = mean over sequences of (sum_t l_t / T)`. With `embed_mix = 0` as well this is exactly
the reference's own SFT loss (`_get_batch_logps(..., average_log_prob=True)`, `-logps.mean()`) —
the *per-sequence* token mean, averaged over sequences. It equals unitune's `sft` (batch-level token
mean) only when every row has the same number of response tokens.

[choice] The weights are not detached (the reference computes them from `logps_further` with
grad), so the gradient also flows through `w`; `detach_weights=True` treats them as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unitune.models.head import logit_transform
from unitune.models.logprobs import _decoder_and_head, token_logps
from unitune.objectives.types import TokenLogps

_BLOCK = 256  # block size of the discounted suffix sum (powers gamma^(0..255) stay representable)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ift: {name} must be in [0, 1], got {value}")


@torch.no_grad()
def greedy_predictions(
    decoder: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    *,
    chunk_size: int = 1024,
) -> Tensor:
    """argmax of the LM head at `positions` ([N, 2]: row, position of the predicting hidden state).

    Runs on the ground-truth `input_ids`; returns `[N]` token ids. What the model does to its
    logits after the head (`head.logit_transform`: a positive scale or a soft-cap) is monotone,
    so it cannot change the argmax and is not applied.
    """
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = hidden[positions[:, 0], positions[:, 1]]
    out = [head(rows[i : i + chunk_size]).argmax(-1) for i in range(0, rows.shape[0], chunk_size)]
    return torch.cat(out) if out else input_ids.new_zeros(0)


def ift_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    *,
    embed_mix: float,
    chunk_size: int = 1024,
    **_,
) -> TokenLogps:
    """IFT's two passes; returns the per-token log-probs of the ground-truth response tokens.

    `logp[b, t] = log p(y_t | mixed prefix)` at response positions (`target_mask` and not padding,
    `t >= 1`), 0 elsewhere; see the module docstring for the mixing. Other objective parameters
    (`gamma`, `detach_weights`) are accepted and ignored.
    """
    _check_unit("embed_mix", embed_mix)
    decoder, head = _decoder_and_head(model)
    scored = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    positions = scored.nonzero()  # [N, 2]: (row, t - 1) for each response token y_t
    rows, cols = positions[:, 0], positions[:, 1] + 1  # (row, t)
    targets = input_ids[rows, cols]
    if embed_mix == 0:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        preds = greedy_predictions(
            decoder, head, input_ids, attention_mask, positions, chunk_size=chunk_size
        )
        embed = model.get_input_embeddings()
        embeds = embed(input_ids)
        mixed = (1 - embed_mix) * embeds[rows, cols] + embed_mix * embed(preds).to(embeds.dtype)
        embeds = embeds.index_put((rows, cols), mixed)
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    transform = logit_transform(getattr(model, "config", None))
    logp = token_logps(hidden, head, positions, targets, chunk_size=chunk_size, transform=transform)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out = out.index_put((rows, cols), logp)
    mask = torch.zeros_like(target_mask)
    mask[:, 1:] = scored.to(mask.dtype)
    return TokenLogps(out, mask)


def discounted_suffix_sum(x: Tensor, gamma: float) -> Tensor:
    """`y_t = sum_{k >= t} gamma^(k - t) * x_k` along the last dim of `[B, L]` `x` (differentiable).

    Blocks of `_BLOCK` positions: inside a block a small Toeplitz matmul, across blocks the running
    value carried right to left — no `gamma^-t` factors, so no overflow for long sequences.
    """
    length = x.shape[-1]
    blk = max(1, min(length, _BLOCK))
    i = torch.arange(blk, device=x.device)
    dist = i[None, :] - i[:, None]  # [t, k] -> k - t
    powers = torch.tensor(gamma, dtype=torch.float64, device=x.device) ** dist.clamp(min=0)
    toeplitz = torch.where(dist >= 0, powers, 0.0).to(x.dtype)  # [t, k]
    carry = x.new_zeros(x.shape[:-1])  # y at the first position of the block to the right
    parts = []
    for end in range(length, 0, -blk):
        start = max(0, end - blk)
        n = end - start
        decay = (toeplitz[0, :n].flip(0) * gamma).to(x.dtype)  # gamma^(end - t), t in block
        y = x[..., start:end] @ toeplitz[:n, :n].T + decay * carry[..., None]
        carry = y[..., 0]
        parts.append(y)
    return torch.cat(parts[::-1], dim=-1) if parts else x.clone()


def propagation_weights(nll: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """IFT's relation-propagation weights `w` ([B, L]); 0 off the response, `sum_t w_t = T`.

    `nll` is `l_t = -log p(y_t | ...)` (0 off the response). `gamma == 0` gives uniform weights
    (the reference's special case). See the module docstring for the formula.
    """
    m = mask.to(nll.dtype)
    if gamma == 0:
        return m
    n = m.sum(dim=-1, keepdim=True)
    s = discounted_suffix_sum(nll * m / n.clamp(min=1), gamma) * m
    total = s.sum(dim=-1, keepdim=True)
    return s * (n / torch.where(total > 0, total, torch.ones_like(total)))


def ift(
    lp: TokenLogps, *, embed_mix: float = 0.2, gamma: float = 0.95, detach_weights: bool = False
) -> Tensor:
    """IFT loss: per sequence `sum_t l_t * w_t / T`, mean over sequences (`w`: see the module).

    `embed_mix` (the embedding mix of the second pass, the paper's lambda) is used by
    `ift_forward`; it is accepted here so that it is part of the objective's config.
    `embed_mix = 0, gamma = 0` is exactly the per-sequence token-mean SFT loss averaged over
    sequences. See the module docstring.
    """
    _check_unit("embed_mix", embed_mix)
    _check_unit("gamma", gamma)
    m = lp.mask.to(lp.logp.dtype)
    nll = -lp.logp * m
    w = propagation_weights(nll, m, gamma)
    if detach_weights:
        w = w.detach()
    n = m.sum(dim=-1)
    per_seq = (nll * w).sum(dim=-1) / n.clamp(min=1)
    has = n > 0
    return per_seq[has].sum() / has.sum().clamp(min=1)
