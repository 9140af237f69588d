"""Per-sequence summed log-probs of the response tokens.

The LM head is applied only at positions that predict a response token, a chunk of tokens at a
time, so the full `[batch, length, vocab]` logits are never built. In training, each chunk is
checkpointed: its `[chunk, vocab]` logits are recomputed in the backward pass instead of being kept,
so peak memory for the head is one chunk whatever the batch or sequence length. The head is called
as a module, so that engines which gather a module's weights around its forward (DeepSpeed ZeRO-3,
FSDP) see each use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _chunk_logp(hidden: Tensor, head: nn.Module, targets: Tensor) -> Tensor:
    """log softmax(head(hidden))[targets], in fp32."""
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns hidden states) and the LM head of a causal LM.

    Works for plain transformers models and for peft-wrapped ones (attribute access is forwarded).
    """
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    if head is None or decoder is None:
        raise TypeError(f"{type(model).__name__} has no decoder/LM head; is it a causal LM?")
    return decoder, head


def token_logps(
    hidden: Tensor,
    head: nn.Module,
    positions: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> Tensor:
    """log p(target) for each selected position of `hidden` ([N, H] rows), chunk by chunk."""
    rows = hidden[positions[:, 0], positions[:, 1]]
    trains_head = any(p.requires_grad for p in head.parameters())
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        h, t = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if softcap is not None:
            logits = head(h).float()
            logits = softcap * torch.tanh(logits / softcap)
            out.append(logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, -1))
        elif torch.is_grad_enabled() and (h.requires_grad or trains_head):
            out.append(checkpoint(_chunk_logp, h, head, t, use_reentrant=False))
        else:
            out.append(_chunk_logp(h, head, t))
    return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.float32)


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    *,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the target tokens of each row, and their count.

    Token `i` with `target_mask[:, i] == 1` is scored as `log p(input_ids[:, i] | input_ids[:, :i])`
    from the hidden state at position `i - 1`. Returns `(logp [B] fp32, n_tokens [B])`.
    """
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    positions = mask.nonzero()  # [N, 2]: (row, position of the predicting hidden state)
    targets = input_ids[:, 1:][mask]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    logp = token_logps(hidden, head, positions, targets, chunk_size=chunk_size, softcap=softcap)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, positions[:, 0], logp)
    return sums, mask.sum(dim=1)


def naive_sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Reference implementation over the full logits; for tests and benchmarks only."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (target_mask[:, 1:] * attention_mask[:, 1:]).float()
    return (tok * mask).sum(1), mask.sum(1).long()
