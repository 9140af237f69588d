"""A causal LM as a reward model: `AutoModelForSequenceClassification` with one output.

The reward of a sequence is the model's own forward `logits[:, 0]`: transformers pools the last
non-pad token, which is what an `rm:PATH` judge computes too (`judges/reward_model.py`). The new
one-output `score` head is drawn from torch's RNG, so the caller seeds it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from unitune.models.config import ModelConfig
from unitune.models.errors import ModelLoadError
from unitune.models.lora import check_target_modules
from unitune.models.modes import disable_dropout
from unitune.models.source import check_local_dir, first_line, local_model_path, model_dir

HEAD = "score"  # the classification head of transformers' *ForSequenceClassification LMs


def load_sequence_classifier(
    spec: ModelConfig, *, label: str = "model.name"
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The model of `spec` (builtin, local directory or hub id; safetensors only) with a fresh
    one-output head, and its tokenizer (a pad token always set, the model's `pad_token_id` the
    tokenizer's). With `spec.lora`, a PEFT model (task SEQ_CLS) whose adapters and whole `score`
    head train. Every failure is a one-line `ModelLoadError`."""
    source = model_dir(spec.name, spec.revision, label=label)
    if local_model_path(str(source), label) is not None:
        check_local_dir(source, spec.name, label)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=spec.trust_remote_code
        )
        with warnings.catch_warnings():  # "some weights ... newly initialized: score"
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(
                str(source),
                num_labels=1,
                dtype=getattr(torch, spec.dtype),
                use_safetensors=True,
                trust_remote_code=spec.trust_remote_code,
            )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{label} {spec.name!r}: cannot be loaded as a sequence classifier: {first_line(err)}"
        ) from err
    if getattr(model, HEAD, None) is None:
        raise ModelLoadError(
            f"{label} {spec.name!r}: {type(model).__name__} has no {HEAD!r} head; a reward model "
            "needs a decoder LM's *ForSequenceClassification"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{label} {spec.name!r}: the tokenizer has no pad or EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if spec.attn_implementation is not None:
        try:
            model.set_attn_implementation(spec.attn_implementation)
        except (ImportError, ValueError) as err:
            raise ModelLoadError(
                f"model.attn_implementation {spec.attn_implementation!r}: {first_line(err)}"
            ) from err
    if spec.disable_dropout:
        disable_dropout(model)
    if spec.lora is not None:
        model = _add_lora(model, spec)
    return model, tokenizer


def _add_lora(model: Any, spec: ModelConfig) -> Any:
    """LoRA adapters on the LM (PEFT task SEQ_CLS) and the `score` head trained whole."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = spec.lora
    assert lora is not None
    check_target_modules(model, lora.target_modules)
    targets = lora.target_modules
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="SEQ_CLS",
        modules_to_save=[HEAD],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, config)
