"""The load-time probe: unitune's log-probs must equal the model's own.

unitune never asks a model for its full logits in training; it runs the decoder and applies the
LM head itself (`logprobs.py`), plus what the model does after its head (`head.py`). A model
whose forward does anything else after its decoder (a transform missing from the table, a
multi-module head, a vocabulary slice) would train on wrong numbers and exit 0. So every model
`load_model` returns has been run once, on a few tokens, through both `sequence_logps` and
`model(...).logits -> log_softmax -> gather`; a disagreement beyond float tolerance is a
one-line `ModelLoadError` naming the architecture.
"""

from __future__ import annotations

from typing import Any

import torch

from unitune.models.errors import ModelLoadError
from unitune.models.logprobs import naive_sequence_logps, sequence_logps
from unitune.models.modes import eval_mode

PROBE_TEXT = "The quick brown fox jumps over the lazy dog, then naps in the sun."
PROBE_TOKENS = 12

# mean |difference| per token, in nats, above which the two paths disagree: fp32 rounding is
# ~1e-6; bf16/fp16 logits are rounded to ~3 significant digits (a logit near 20 by up to 0.06).
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 0.25


def probe_batch(tokenizer: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of a short fixed text, `PROBE_TOKENS` and `PROBE_TOKENS // 2 + 1`
    tokens long (EOS-padded if it encodes shorter): `(input_ids, attention_mask)`. Two lengths,
    so the padded path meets padding and the packed path two sequences in one row."""
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])[:PROBE_TOKENS]
    ids += [tokenizer.eos_token_id] * (PROBE_TOKENS - len(ids))
    short = PROBE_TOKENS // 2 + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = torch.tensor([ids, ids[:short] + [pad] * (PROBE_TOKENS - short)], dtype=torch.long)
    mask = torch.ones_like(rows)
    mask[1, short:] = 0
    return rows.clamp_(max=vocab_size - 1), mask


def architecture(model: Any) -> str:
    """`ClassName (model_type)` of the model under any PEFT wrapper, for messages."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return f"{type(base).__name__} ({model_type})" if model_type else type(base).__name__


def logprob_gap(model: Any, tokenizer: Any, *, packed: bool = False) -> tuple[float, torch.dtype]:
    """Mean |unitune's log-prob - the model's own| per token on the probe batch, and the dtype
    of the model's weights. One forward through each path, in eval mode, without gradients.
    `packed`: unitune's padding-free path (`train.packing`) instead of the padded one."""
    embed = model.get_input_embeddings()
    ids, mask = (t.to(embed.weight.device) for t in probe_batch(tokenizer, embed.num_embeddings))
    with torch.no_grad(), eval_mode(model):
        ours, n = sequence_logps(model, ids, mask, mask, packed=packed)
        theirs, _ = naive_sequence_logps(model, ids, mask, mask)
    gap = float((ours - theirs).abs().sum() / n.sum().clamp(min=1))
    return gap, embed.weight.dtype


def check_logprobs(
    model: Any, tokenizer: Any, *, label: str = "model.name", name: str = "", packed: bool = False
) -> None:
    """Raise a one-line `ModelLoadError` unless unitune's chunked log-probs equal the model's own
    forward (within float tolerance for its dtype) on a few tokens. `packed`: check the
    padding-free path of `train.packing` (each packed sequence must attend only to itself)."""
    who = f"{label} {name!r}" if name else label
    arch = architecture(model)
    try:
        gap, dtype = logprob_gap(model, tokenizer, packed=packed)
    except (TypeError, AttributeError, NotImplementedError) as err:
        raise ModelLoadError(
            f"{who}: {arch} cannot be scored by unitune's log-prob path ({err}); "
            "it needs a causal LM with a decoder and an LM head"
        ) from err
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    if not gap <= tolerance:  # also catches NaN
        dtype_name = str(dtype).removeprefix("torch.")
        if packed:
            raise ModelLoadError(
                f"{who}: unitune's packed log-probs (train.packing) for {arch} differ from the "
                f"model's own forward by {gap:.3g} nats per token (tolerance {tolerance:g} for "
                f"{dtype_name}): this model and transformers version do not keep packed "
                "sequences apart; train without train.packing"
            )
        raise ModelLoadError(
            f"{who}: unitune's log-probs for {arch} differ from the model's own forward by "
            f"{gap:.3g} nats per token (tolerance {tolerance:g} for {dtype_name}):"
            " its forward changes the logits after the LM head in a way unitune does not apply "
            "(see unitune/models/head.py); this architecture is not supported"
        )
