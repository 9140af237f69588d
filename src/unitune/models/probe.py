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


def probe_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """`[1, PROBE_TOKENS]` token ids of a short fixed text (EOS-padded if it encodes shorter)."""
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])[:PROBE_TOKENS]
    ids += [tokenizer.eos_token_id] * (PROBE_TOKENS - len(ids))
    return torch.tensor([ids], dtype=torch.long).clamp_(max=vocab_size - 1)


def architecture(model: Any) -> str:
    """`ClassName (model_type)` of the model under any PEFT wrapper, for messages."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return f"{type(base).__name__} ({model_type})" if model_type else type(base).__name__


def logprob_gap(model: Any, tokenizer: Any) -> tuple[float, torch.dtype]:
    """Mean |unitune's log-prob - the model's own| per token on the probe text, and the dtype
    of the model's weights. One forward through each path, in eval mode, without gradients."""
    embed = model.get_input_embeddings()
    ids = probe_ids(tokenizer, embed.num_embeddings).to(embed.weight.device)
    mask = torch.ones_like(ids)
    with torch.no_grad(), eval_mode(model):
        ours, n = sequence_logps(model, ids, mask, mask)
        theirs, _ = naive_sequence_logps(model, ids, mask, mask)
    gap = float((ours - theirs).abs().sum() / n.sum().clamp(min=1))
    return gap, embed.weight.dtype


def check_logprobs(
    model: Any, tokenizer: Any, *, label: str = "model.name", name: str = ""
) -> None:
    """Raise a one-line `ModelLoadError` unless unitune's chunked log-probs equal the model's own
    forward (within float tolerance for its dtype) on a few tokens."""
    who = f"{label} {name!r}" if name else label
    arch = architecture(model)
    try:
        gap, dtype = logprob_gap(model, tokenizer)
    except (TypeError, AttributeError, NotImplementedError) as err:
        raise ModelLoadError(
            f"{who}: {arch} cannot be scored by unitune's log-prob path ({err}); "
            "it needs a causal LM with a decoder and an LM head"
        ) from err
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    if not gap <= tolerance:  # also catches NaN
        dtype_name = str(dtype).removeprefix("torch.")
        raise ModelLoadError(
            f"{who}: unitune's log-probs for {arch} differ from the model's own forward by "
            f"{gap:.3g} nats per token (tolerance {tolerance:g} for {dtype_name}):"
            " its forward changes the logits after the LM head in a way unitune does not apply "
            "(see unitune/models/head.py); this architecture is not supported"
        )
