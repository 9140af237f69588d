"""What a causal LM does to its logits after the LM head, in one table.

unitune applies the LM head itself, a chunk of rows at a time (`logprobs.token_logps`), so it
must also apply whatever the model's own `ForCausalLM.forward` does between `lm_head(...)` and
the loss; skipping it trains on wrong numbers, silently. The table below was read from the
modeling files of transformers 5.24 (every `*ForCausalLM.forward`, the lines between
`self.lm_head(` and the loss):

- multiply by a scale: Cohere, Cohere2, Cohere2-MoE, Cohere-Compass (`logit_scale`),
  HyperCLOVA X (`logits_scaling`), Falcon-H1 (`lm_head_multiplier`);
- divide by a scale: Granite, Granite-SWA, GraniteMoe, GraniteMoe-SWA, GraniteMoeShared,
  GraniteMoeHybrid (`logits_scaling`);
- soft-cap, `cap * tanh(logits / cap)`: Gemma2, Gemma3, Gemma3n, Gemma4, VaultGemma, NanoChat,
  Beam, Inkling2 (`final_logit_softcapping`), RecurrentGemma (`logits_soft_cap`), xLSTM
  (`output_logit_soft_cap`).

Not covered (the load-time probe, `probe.check_logprobs`, refuses them): Inkling, which drops
the padded vocabulary rows after its head, and heads that are more than one module
(ModernBERT-decoder, Electra). A model not listed here whose forward does something else after
its head is caught by the same probe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LogitTransform = Callable[[Tensor], Tensor]

# model_type -> (operation, config attribute)
POST_HEAD: dict[str, tuple[str, str]] = {
    "cohere": ("multiply", "logit_scale"),
    "cohere2": ("multiply", "logit_scale"),
    "cohere2_moe": ("multiply", "logit_scale"),
    "cohere_compass_text": ("multiply", "logit_scale"),
    "hyperclovax": ("multiply", "logits_scaling"),
    "falcon_h1": ("multiply", "lm_head_multiplier"),
    "granite": ("divide", "logits_scaling"),
    "granite_swa": ("divide", "logits_scaling"),
    "granitemoe": ("divide", "logits_scaling"),
    "granitemoe_swa": ("divide", "logits_scaling"),
    "granitemoeshared": ("divide", "logits_scaling"),
    "granitemoehybrid": ("divide", "logits_scaling"),
    "gemma2": ("softcap", "final_logit_softcapping"),
    "gemma3_text": ("softcap", "final_logit_softcapping"),
    "gemma3n_text": ("softcap", "final_logit_softcapping"),
    "gemma4_text": ("softcap", "final_logit_softcapping"),
    "gemma4_unified_text": ("softcap", "final_logit_softcapping"),
    "vaultgemma": ("softcap", "final_logit_softcapping"),
    "nanochat": ("softcap", "final_logit_softcapping"),
    "beam": ("softcap", "final_logit_softcapping"),
    "inkling2_text": ("softcap", "final_logit_softcapping"),
    "inkling2_loop_text": ("softcap", "final_logit_softcapping"),
    "recurrent_gemma": ("softcap", "logits_soft_cap"),
    "xlstm": ("softcap", "output_logit_soft_cap"),
}


def _multiply(value: float) -> LogitTransform:
    return lambda logits: logits * value


def _divide(value: float) -> LogitTransform:
    return lambda logits: logits / value


def _softcap(cap: float) -> LogitTransform:
    return lambda logits: cap * torch.tanh(logits / cap)


_OPERATIONS: dict[str, Callable[[float], LogitTransform]] = {
    "multiply": _multiply,
    "divide": _divide,
    "softcap": _softcap,
}


def logit_transform(config: object) -> LogitTransform | None:
    """The function the model applies to its fp32 logits after the LM head, or None (identity).

    `config` is the model's (or a PEFT-wrapped model's) `PretrainedConfig`; a multimodal config
    is read through its text config. An attribute that is None means no transform, as in the
    models' own code (e.g. Gemma2 with `final_logit_softcapping: null`).
    """
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    entry = POST_HEAD.get(getattr(text, "model_type", None) or "")
    if entry is None:
        return None
    operation, attr = entry
    value = getattr(text, attr, None)
    if value is None:
        return None
    return _OPERATIONS[operation](float(value))
