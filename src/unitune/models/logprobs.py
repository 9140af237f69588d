"""Per-sequence summed log-probs of the response tokens.

The LM head is applied only at positions that predict a response token, a chunk of tokens at a
time, so the full `[batch, length, vocab]` logits are never built. In training, each chunk is
checkpointed: its `[chunk, vocab]` logits are recomputed in the backward pass instead of being kept,
so peak memory for the head is one chunk whatever the batch or sequence length. The head is called
as a module, so that engines which gather a module's weights around its forward (DeepSpeed ZeRO-3,
FSDP) see each use. Whatever the model itself does to its logits after the head (Cohere's scale,
Granite's divisor, Gemma2's soft-cap: `head.logit_transform`) is applied to each chunk, and
`probe.check_logprobs` checks at load time that the result equals the model's own forward.

Packed (padding-free) pass, `sequence_logps(..., packed=True)` (`train.packing`): the padding of a
right-padded batch is removed and its rows are concatenated into one row `[1, sum(lengths)]`, with
`position_ids` restarting at 0 for each sequence, and the decoder runs with `attention_mask=None`.
transformers (5.x) reads the packing from the position ids:

- sdpa, eager, flex_attention: `masking_utils.create_causal_mask` -> `_preprocess_mask_arguments`
  calls `find_packed_sequence_indices(position_ids)` (a new sequence wherever the position does
  not go up by 1) when the 2-D mask is None *and there is no cache*, and the causal mask is
  and-ed with `packed_sequence_mask_function`: block-diagonal causal, each sequence sees only
  itself. The model's default `use_cache=True` would create a `DynamicCache` and skip that
  detection silently (one causal mask across all sequences), so the decoder is called with
  `use_cache=False`.
- flash_attention_2/3/4 (and hub flash kernels): `modeling_flash_attention_utils.
  _flash_attention_forward` runs `flash_attn_varlen_func` when `cu_seq_lens_q/k` and
  `max_length_q/k` are given; without them it re-derives them from `position_ids`
  (`_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`) in every layer, each time a
  device sync. They are computed once here and passed, as transformers'
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` does (`max_length_*` as Python
  ints). Tested against a CPU stand-in for the kernel only, not on a GPU.

sdpa and eager are tested (tests/test_packing.py); flex_attention was checked by hand (forward
only: on CPU it has no backward).

Any other attention implementation is refused (`packed_attention_check`) rather than risking a
mask that ignores the packing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unitune.core.phases import PHASES
from unitune.models.head import LogitTransform, logit_transform


def _chunk_logp(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log softmax(transform(head(hidden)) / temperature)[targets], in fp32. Profiled as `head`,
    or `head_recompute` when the checkpoint reruns it inside backward."""
    if not PHASES.enabled:
        return _head_logp(hidden, head, targets, transform, temperature)
    name = "head_recompute" if torch._C._current_graph_task_id() != -1 else "head"
    with PHASES.phase(name):
        return _head_logp(hidden, head, targets, transform, temperature)


def _head_logp(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    transform: LogitTransform | None,
    temperature: float,
) -> Tensor:
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    if temperature != 1.0:
        logits = logits / temperature
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
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log p(target) for each selected position of `hidden` ([N, H] rows), chunk by chunk.

    `transform`: what the model does to its logits after the head (`head.logit_transform`);
    `temperature`: the logits are divided by it (the distribution a sampler at that temperature
    draws from). In training each chunk's logits are recomputed in backward, not kept: keeping
    them (about 0.34 GB on the benchmark's DPO step) measured no faster on a CPU
    (`benchmarks/step_levers.py`)."""
    rows = hidden[positions[:, 0], positions[:, 1]]
    trains_head = any(p.requires_grad for p in head.parameters())
    grad = torch.is_grad_enabled() and (rows.requires_grad or trains_head)
    PHASES.count("head_rows" if grad else "nograd_head_rows", rows.shape[0])
    out = []
    for start in range(0, rows.shape[0], chunk_size):
        h, t = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            lp = checkpoint(_chunk_logp, h, head, t, transform, temperature, use_reentrant=False)
        else:
            lp = _chunk_logp(h, head, t, transform, temperature)
        if grad and PHASES.enabled and h.requires_grad:  # the chunk's backward, recompute nested
            lp.register_hook(lambda g: PHASES.enter("head_backward"))
            h.register_hook(lambda g: PHASES.exit("head_backward"))
        out.append(lp)
    return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.float32)


def _count_tokens(attention_mask: Tensor, padded: int) -> None:
    """The decoder's work for the profile (`train.profile`): real and padded tokens."""
    if PHASES.enabled:
        grad = "" if torch.is_grad_enabled() else "nograd_"
        PHASES.count(f"{grad}tokens", float(attention_mask.sum()))
        PHASES.count(f"{grad}padded_tokens", padded)


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    *,
    chunk_size: int = 1024,
    packed: bool = False,
    decoder: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the target tokens of each row, and their count.

    Token `i` with `target_mask[:, i] == 1` is scored as `log p(input_ids[:, i] | input_ids[:, :i])`
    from the hidden state at position `i - 1`. Returns `(logp [B] fp32, n_tokens [B])`.
    `packed`: one padding-free decoder pass over all rows (`packed_sequence_logps`), the same
    result up to floating-point rounding. `decoder`: what runs in place of the model's decoder
    (`train.compile`: its compiled form; not with `packed`).
    """
    if packed:
        return packed_sequence_logps(
            model, input_ids, attention_mask, target_mask, chunk_size=chunk_size
        )
    own, head = _decoder_and_head(model)
    decoder = own if decoder is None else decoder
    _count_tokens(attention_mask, input_ids.numel())
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # no KV cache: nothing is generated
    mask = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    positions = mask.nonzero()  # [N, 2]: (row, position of the predicting hidden state)
    targets = input_ids[:, 1:][mask]
    transform = logit_transform(getattr(model, "config", None))
    logp = token_logps(hidden, head, positions, targets, chunk_size=chunk_size, transform=transform)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, positions[:, 0], logp)
    return sums, mask.sum(dim=1)


def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    starts: Tensor,
    width: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-token log-probs of sampled completions at the sampling temperature, `[B, width]`.

    Row `b` of the right-padded batch holds a prompt of `starts[b]` tokens followed by its
    completion; entry `(b, t)` is `log softmax(logits / temperature)` of token
    `input_ids[b, starts[b] + t]` given everything before it, for `t < width` where that position
    is attended, and 0 elsewhere. Only the completion positions go through the LM head (chunked,
    checkpointed in training, as `sequence_logps`). Dividing by the temperature makes these the
    log-probs of the distribution the sampler drew from (TRL PR #3029: GRPO computed them at
    temperature 1)."""
    decoder, head = _decoder_and_head(model)
    _count_tokens(attention_mask, input_ids.numel())
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # no KV cache: nothing is generated
    b, length = input_ids.shape
    cols = starts[:, None].to(input_ids.device) + torch.arange(width, device=input_ids.device)
    inside = cols < length
    cols = cols.clamp(max=length - 1)
    wanted = inside & attention_mask.gather(1, cols).bool() & (cols > 0)
    rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, width)
    positions = torch.stack([rows[wanted], cols[wanted] - 1], dim=1)  # the predicting states
    targets = input_ids[rows[wanted], cols[wanted]]
    transform = logit_transform(getattr(model, "config", None))
    logp = token_logps(
        hidden, head, positions, targets,
        chunk_size=chunk_size, transform=transform, temperature=temperature,
    )  # fmt: skip
    out = torch.zeros(b, width, dtype=torch.float32, device=input_ids.device)
    return out.masked_scatter(wanted, logp)


def _is_flash(impl: str | None) -> bool:
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(requested_attention_implementation=impl)


# attention implementations whose masks transformers builds from packed position ids (module doc)
PACKED_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


def packed_attention_check(decoder: nn.Module) -> bool:
    """Whether the decoder's attention is a flash kernel (varlen kwargs wanted); raises ValueError
    for an attention implementation that cannot keep packed sequences apart."""
    impl = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
    if _is_flash(impl):
        return True
    if impl in PACKED_MASK_ATTENTION:
        return False
    raise ValueError(
        f"train.packing: attention implementation {impl!r} cannot run packed sequences (its mask "
        f"would let them see each other); use one of {', '.join(PACKED_MASK_ATTENTION)} or "
        "flash_attention_2, or set train.packing: false"
    )


def pack(input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """A right-padded batch `[B, L]` as one padding-free row: `input_ids` and `position_ids`
    `[1, sum(lengths)]` (positions restart at 0 for each row), `offsets` `[B]` (where each row
    starts in the packed row), `cu_seq_lens` `[n + 1]` int32 (FlashAttention's cumulative lengths
    of the n non-empty rows) and `max_length` (int). Raises ValueError unless each row's tokens
    are a prefix of it (right padding)."""
    length = input_ids.shape[1]
    lengths = attention_mask.sum(dim=1)
    ar = torch.arange(length, device=input_ids.device)
    valid = ar[None, :] < lengths[:, None]
    if not torch.equal(valid, attention_mask.bool()):
        raise ValueError("packed log-probs need right-padded rows (attention_mask 1...1 0...0)")
    offsets = torch.cumsum(lengths, 0) - lengths
    nonzero = lengths[lengths > 0]
    cu = torch.zeros(nonzero.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = torch.cumsum(nonzero, 0)
    return {
        "input_ids": input_ids[valid][None],
        "position_ids": ar.expand_as(input_ids)[valid][None],
        "offsets": offsets,
        "cu_seq_lens": cu,
        "max_length": int(lengths.max()) if lengths.numel() else 0,
    }


def packed_sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    *,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """`sequence_logps` through one padding-free decoder pass: the rows of the right-padded batch
    packed into one row, each sequence attending only to itself (see the module docstring).
    Returns the same `(logp [B] fp32, n_tokens [B])`."""
    decoder, head = _decoder_and_head(model)
    flash = packed_attention_check(decoder)
    p = pack(input_ids, attention_mask)
    _count_tokens(attention_mask, p["input_ids"].numel())
    kwargs = {}
    if flash:
        cu, m = p["cu_seq_lens"], p["max_length"]
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}
    hidden = decoder(
        input_ids=p["input_ids"],
        attention_mask=None,
        position_ids=p["position_ids"],
        use_cache=False,  # with a cache, transformers does not look for packed sequences
        **kwargs,
    ).last_hidden_state  # [1, T, H]
    mask = target_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    positions = mask.nonzero()  # [N, 2]: (row, position of the predicting hidden state)
    rows = positions[:, 0]
    packed_pos = torch.stack([torch.zeros_like(rows), p["offsets"][rows] + positions[:, 1]], 1)
    targets = input_ids[:, 1:][mask]
    transform = logit_transform(getattr(model, "config", None))
    logp = token_logps(
        hidden, head, packed_pos, targets, chunk_size=chunk_size, transform=transform
    )
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, rows, logp)
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
