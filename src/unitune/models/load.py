"""Loading a model for training or evaluation.

`load_model` turns the `model:` section of the config into a ready-to-train model and tokenizer.
Weights are only ever read from safetensors files: a pickle (`.bin`) file from a user path or
a hub repo can execute code on load, so it is refused rather than trusted (`source.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from unitune.core.progress import transformers_bars_off
from unitune.models.builtin import (
    BUILTIN_SMOLLM2,
    BUILTIN_TINY,
    load_tiny,
    smollm2_cache_dir,
    unknown_builtin,
)
from unitune.models.errors import ModelLoadError
from unitune.models.lora import add_lora, is_peft
from unitune.models.modes import disable_dropout
from unitune.models.probe import check_logprobs
from unitune.models.source import (
    check_local_dir,
    first_line,
    hub_problem,
    local_model_path,
)

if TYPE_CHECKING:
    from unitune.models.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    spec: ModelConfig, *, label: str = "model.name", probe: bool = True
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the model and tokenizer described by `spec`, ready for training.

    Returns a `PreTrainedModel` (full fine-tuning) or a `PeftModel` (when `spec.lora` is set) and
    its tokenizer, which always has an EOS and a pad token. `use_cache` is off: training never
    reuses past key/values, and keeping them costs memory.

    Every failure to load is a one-line `ModelLoadError` naming `label` and `spec.name`. Local
    names are checked as in `check_model_source`; the hub is not probed beforehand (the CLI calls
    `check_model_source` first), but hub errors raised while loading get the same messages.

    With `spec.disable_dropout` every dropout of the model is off (`modes.disable_dropout`;
    LoRA's own `lora.dropout` is kept as configured). `probe` (default on): one forward on a few
    tokens checks that unitune's log-probs equal the model's own (`probe.check_logprobs`), so an
    architecture that does something unitune does not apply to its logits stops here, in one line.
    """
    dtype = _DTYPES[spec.dtype]
    if spec.name == BUILTIN_TINY:
        model, tokenizer = load_tiny(dtype)
    elif spec.name == BUILTIN_SMOLLM2:
        model, tokenizer = _load_pretrained(str(smollm2_cache_dir()), dtype=dtype, label=label)
    elif spec.name.startswith("builtin:"):
        raise ModelLoadError(unknown_builtin(spec.name, label))
    else:
        model, tokenizer = _load_pretrained(
            spec.name,
            dtype=dtype,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            label=label,
        )
    _check_tokenizer(model, tokenizer, spec.name)
    model.config.use_cache = False
    if spec.attn_implementation is not None:
        try:
            model.set_attn_implementation(spec.attn_implementation)
        except (ImportError, ValueError) as err:  # unknown name, kernel not installed or usable
            raise ModelLoadError(
                f"model.attn_implementation {spec.attn_implementation!r}: {first_line(err)}"
            ) from err
    if spec.disable_dropout:
        disable_dropout(model)
    if spec.lora is not None:
        model = add_lora(model, spec.lora)
    if probe:
        check_logprobs(model, tokenizer, label=label, name=spec.name)
    return model, tokenizer


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (`train.gradient_checkpointing`): activation memory falls from one set per layer to one layer's,
    for about one more forward per step. Non-reentrant, so it works with LoRA's frozen inputs and
    with an objective's two forwards before one backward (IFT)."""
    base = model.get_base_model() if is_peft(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelLoadError(
            f"train.gradient_checkpointing: {type(base).__name__} does not support it"
        )
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_pretrained(
    name: str,
    *,
    dtype: torch.dtype,
    revision: str | None = None,
    trust_remote_code: bool = False,
    label: str = "model.name",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local directory or a hub id, through plain `from_pretrained` (safetensors only)."""
    path = local_model_path(name, label)
    if path is not None:
        check_local_dir(path, name, label)
        source = str(path)
    else:
        source = name
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        with transformers_bars_off():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, use_safetensors=True, **common
            )
    except (OSError, ValueError) as err:  # transformers wraps hub errors in OSError
        problem = hub_problem(err, name, revision, label) if path is None else None
        raise ModelLoadError(
            problem or f"{label} {name!r}: cannot be loaded: {first_line(err)}"
        ) from err
    return model, tokenizer


def _check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Every response ends in EOS, and batches need a pad id: make sure both exist.

    A missing pad token is set to EOS; padded positions are masked out (attention and target
    masks), so which id fills them does not change any loss.
    """
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {name} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ModelLoadError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but the model's embedding "
            f"has only {n_embed} rows"
        )
