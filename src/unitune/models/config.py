"""The `model:` section of a run's config, owned by the models layer that reads it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from unitune.core.schema import Strict


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # PEFT's "all-linear" (every linear layer but the LM head, on any architecture), or a list
    # of module names (e.g. [q_proj, v_proj]); docs/methods.md, "LoRA targets"
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    merge_on_save: bool = False  # save the merged full model instead of the adapter


class ModelConfig(Strict):
    name: str = "builtin:smollm2-135m"  # local dir, hub id, builtin:smollm2-135m or builtin:tiny
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    # transformers' attention kernel: "sdpa", "eager", "flash_attention_2" (needs the
    # flash-attn package and a GPU; padding-free with train.packing), ...; None: the model's
    attn_implementation: str | None = None
    # every dropout of the policy off (as TRL's disable_dropout=True): train mode computes what
    # eval mode does, so r = log pi - log pi_ref is 0 at step 0 and packed = padded
    disable_dropout: bool = True
