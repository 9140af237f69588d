"""Where a model comes from, checked before anything else runs: a builtin, a local directory
(safetensors only: pickle weights can run code on load) or a Hugging Face Hub id (reachable, or
cached, with safetensors weights). Every failure is one `ModelLoadError` line naming the config
key, the name, the problem and what to do.

`check_model_source` is the cheap check the CLI runs before any data is read; `model_dir` turns a
name into a local directory of safetensors files (for merging and PAFT, which read files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from unitune.models.builtin import (
    BUILTIN_SMOLLM2,
    BUILTIN_TINY,
    smollm2_cache_dir,
    smollm2_cached,
    smollm2_gguf_path,
    tiny_dir,
    unknown_builtin,
)
from unitune.models.errors import ModelLoadError

if TYPE_CHECKING:
    from unitune.models.config import ModelConfig

_PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl")


_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_HUB_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_HUB_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OFFLINE_REMEDY = "use a local directory, or a cached copy with HF_HUB_OFFLINE=1"


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
        if not smollm2_cached():
            smollm2_gguf_path()  # raises, saying how to install it
        return
    if name.startswith("builtin:"):
        raise ModelLoadError(unknown_builtin(name, label))
    path = local_model_path(name, label)
    if path is not None:
        check_local_dir(path, name, label)
        return
    check_hub_model(name, spec.revision, label)


def model_dir(name: str, revision: str | None = None, *, label: str = "model") -> Path:
    """A model or adapter as a local directory of safetensors, config and tokenizer files.

    Builtins come from the cache (`builtin:tiny` is saved there on first use), local directories
    are used as they are, and hub ids are downloaded (safetensors, JSON and tokenizer files only;
    never pickles).
    """
    if name == BUILTIN_SMOLLM2:
        return smollm2_cache_dir()
    if name == BUILTIN_TINY:
        return tiny_dir()
    if name.startswith("builtin:"):
        raise ModelLoadError(unknown_builtin(name, label))
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


def local_model_path(name: str, label: str = "model.name") -> Path | None:
    """The local path `name` refers to, or None when it is to be read as a hub id.

    An existing path is returned as it is (`~` expanded). A missing one is a `ModelLoadError`
    ("no such directory") when `name` can only be a path: it starts with `/`, `./`, `../` or `~`,
    ends with a path separator, is not a valid hub id (`name` or `owner/name`), contains a
    backslash, or contains `/` and its first component exists here (`models/mine` with a
    `models/` directory in the working directory). Otherwise it is a hub id.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    first = name.replace("\\", "/").split("/")[0]
    path_like = (
        name.startswith(_PATH_PREFIXES)
        or name in (".", "..")
        or name.endswith(("/", "\\"))
        or "\\" in name
        or ("/" in name and first not in ("", ".", "..") and Path(first).exists())
        or not _valid_hub_id(name)
    )
    if path_like:
        where = path if path.is_absolute() else Path.cwd() / path
        raise ModelLoadError(
            f"{label} {name!r}: no such directory: {where} does not exist; check the path "
            "(relative paths start from the working directory)"
        )
    return None


def _valid_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_model(name: str, revision: str | None, label: str) -> None:
    """`name` as a hub id: `config.json` fetchable (or cached) and safetensors weights there."""
    from huggingface_hub import file_exists, hf_hub_download, is_offline_mode

    offline = is_offline_mode()
    if not offline:
        unreachable = hub_unreachable()
        if unreachable is not None:
            if _cached(name, "config.json", revision):
                return  # loading falls back to the cached copy
            raise ModelLoadError(unreachable_message(name, label, unreachable))
    try:
        hf_hub_download(name, "config.json", revision=revision)
    except Exception as err:  # every hub failure becomes one line
        raise ModelLoadError(hub_problem(err, name, revision, label)) from None

    def has(filename: str) -> bool:
        if offline:
            return _cached(name, filename, revision)
        try:
            return file_exists(name, filename, revision=revision)
        except Exception as err:
            raise ModelLoadError(hub_problem(err, name, revision, label)) from None

    if any(has(f) for f in _HUB_SAFETENSORS):
        return
    if offline:
        raise ModelLoadError(
            f"{label} {name!r}: HF_HUB_OFFLINE=1 and the cached copy has no safetensors weights "
            f"({' or '.join(_HUB_SAFETENSORS)}); download it once with network access, or use a "
            "local directory"
        )
    pickles = [f for f in _HUB_PICKLES if has(f)]
    if pickles:
        raise ModelLoadError(f"{label} {name!r}: the Hugging Face Hub repo {_pickle_text(pickles)}")
    raise ModelLoadError(
        f"{label} {name!r}: the Hugging Face Hub repo has no safetensors weights "
        f"({' or '.join(_HUB_SAFETENSORS)}); check the name, or use a local directory"
    )


def _cached(name: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, filename, revision=revision), str)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one request, no retries), or None if it answers at all."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # any transport failure (DNS, refused, timeout, proxy)
        return first_line(err) or type(err).__name__
    return None


def unreachable_message(name: str, label: str, reason: str) -> str:
    from huggingface_hub import constants

    return (
        f"{label} {name!r}: not a local directory, and the Hugging Face Hub "
        f"({constants.ENDPOINT}) could not be reached ({reason}) and has no cached copy of it; "
        f"{OFFLINE_REMEDY}"
    )


def hub_problem(err: BaseException, name: str, revision: str | None, label: str) -> str | None:
    """The one-line message for a hub failure found anywhere in `err`'s chain (transformers
    wraps hub errors), or None when the chain holds no hub error."""
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub import errors as hub

    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, hub.GatedRepoError):
            return (
                f"{label} {name!r}: a gated Hugging Face Hub repo you have no access to; accept "
                f"its terms on {constants.ENDPOINT}/{name} and log in (`hf auth login`), or use a "
                "local directory"
            )
        if isinstance(e, hub.RepositoryNotFoundError):
            return (
                f"{label} {name!r}: not a local directory, and no such model on the Hugging Face "
                "Hub (or it is private: log in with `hf auth login`); check the name, or write a "
                "local path as ./NAME or /abs/path"
            )
        if isinstance(e, hub.RevisionNotFoundError):
            return (
                f"{label} {name!r}: the Hugging Face Hub repo has no revision {revision!r}; check "
                "the revision"
            )
        if isinstance(e, hub.OfflineModeIsEnabled) or (
            isinstance(e, hub.LocalEntryNotFoundError) and is_offline_mode()
        ):
            return (
                f"{label} {name!r}: not a local directory, and HF_HUB_OFFLINE=1 but the Hugging "
                f"Face cache ({constants.HF_HUB_CACHE}) has no copy of it; use a local directory, "
                "or download it once with network access"
            )
        if isinstance(e, hub.LocalEntryNotFoundError):
            return unreachable_message(name, label, "connection failed")
        if isinstance(e, hub.EntryNotFoundError):
            return (
                f"{label} {name!r}: the Hugging Face Hub repo has no config.json, so it is not a "
                "transformers model; check the name"
            )
        if isinstance(e, hub.HfHubHTTPError):
            return f"{label} {name!r}: the Hugging Face Hub refused it: {first_line(e)}"
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def check_local_dir(path: Path, name: str | None = None, label: str = "model.name") -> None:
    """Refuse directories we would otherwise fail on obscurely (or load pickles from): a file,
    a directory with only pickle weights, only a LoRA adapter, or no weights at all."""
    shown = name if name is not None else str(path)
    who = f"{label} {shown!r}"
    if not path.is_dir():
        raise ModelLoadError(f"{who} is a file; model.name must be a directory of a saved model")
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    refusal = pickle_refusal(path)
    if refusal:
        raise ModelLoadError(f"{who} {refusal}")
    if "adapter_config.json" in files:
        raise ModelLoadError(
            f"{who} holds a LoRA adapter, not a full model; save with merge_lora "
            "(lora.merge_on_save: true) to get a directory that loads on its own"
        )
    raise ModelLoadError(f"{who} has no model weights (*.safetensors)")


def pickle_refusal(path: Path) -> str | None:
    """Why a directory whose only weights are PyTorch pickles is refused (None if it has none):
    the end of a sentence whose subject is the directory."""
    pickles = sorted(
        p.name for p in path.iterdir() if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES)
    )
    return _pickle_text(pickles) if pickles else None


def _pickle_text(pickles: list[str]) -> str:
    return (
        f"has only PyTorch pickle weights ({', '.join(pickles)}) and no .safetensors file. "
        "unitune loads safetensors only, because loading a pickle can run arbitrary code. If you "
        "trust the files, convert them once: "
        "AutoModelForCausalLM.from_pretrained(DIR, use_safetensors=False).save_pretrained(NEW_DIR)"
    )


def cached_snapshot(name: str, revision: str | None) -> bool:
    """Whether the hub cache holds a snapshot of `name` (at `revision`, default main)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:
        return False
    return True
