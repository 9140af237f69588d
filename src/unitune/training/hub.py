"""Upload a saved model to the Hugging Face Hub (`train.push_to_hub`, `unitune push`).

`require_token()` fails before training when there is no token (`HF_TOKEN` or a cached
`hf auth login`); `push_model(model_dir, repo_id, ...)` creates the repo (`exist_ok`) and uploads
the directory, model card included. Every failure is one `HubError` line: after training it says
where the model is saved and how to push it later. The token is read from the environment (or
huggingface_hub's cache) when needed and never written or printed: messages are redacted.
"""

from __future__ import annotations

import os
from pathlib import Path

from unitune.config import repo_id_problem
from unitune.core.io import atomic_write
from unitune.core.redact import redact
from unitune.training.modelcard import card_from_run


class HubError(RuntimeError):
    """The Hub cannot be used: no token, a bad repo id, or the upload failed (one line)."""


def token() -> str | None:
    """The Hub token: `HF_TOKEN`, else the one `hf auth login` cached (None without either)."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def require_token(what: str = "train.push_to_hub") -> None:
    """Fail, before any training, when pushing could not authenticate."""
    if not token():
        raise HubError(
            f"{what}: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with "
            "write access), or remove push_to_hub"
        )


def _reason(err: BaseException) -> str:
    """One line: the error's first line and the server's message (redacted: a server may echo
    what it was sent)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    text = lines[0] if lines else type(err).__name__
    server = " ".join(str(getattr(err, "server_message", None) or "").split())
    if server and server not in text:
        text += f" ({server})"
    return redact(text if len(text) <= 400 else text[:397] + "...")


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    run_dir: str | Path | None = None,
) -> str:
    """Create `repo_id` (private by default; an existing repo is kept as it is) and upload
    `model_dir` to it; returns the repo's URL. `HF_ENDPOINT` names another Hub endpoint."""
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    run_dir = Path(run_dir) if run_dir is not None else model_dir.parent
    problem = repo_id_problem(repo_id)
    if problem:
        raise HubError(f"push to the Hub: {problem}")
    if not model_dir.is_dir():
        raise HubError(f"push to the Hub: {model_dir} is not a directory (no saved model)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=os.environ.get("HF_TOKEN"),
                library_name="unitune")  # fmt: skip
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), repo_type="model",
            commit_message="Upload model trained with unitune",
        )  # fmt: skip
    except Exception as e:  # network, HTTP, auth: all one line with the way out
        raise HubError(
            f"push to {repo_id} failed: {_reason(e)}; the model is saved locally at {model_dir}; "
            f"push it later with: unitune push {run_dir} {repo_id}"
        ) from None
    return str(url)


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = True) -> str:
    """`unitune push RUN_DIR REPO_ID`: the run's `model/` with its model card (rewritten from
    config.yaml and summary.json when the run has them, so that it names `repo_id`)."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    problem = repo_id_problem(repo_id)
    if problem:
        raise HubError(f"unitune push: {problem}")
    if not model_dir.is_dir():
        raise HubError(f"unitune push: {model_dir} does not exist (train with train.save_model)")
    require_token("unitune push")
    try:
        card = card_from_run(run_dir, repo_id=repo_id)
    except (OSError, ValueError):  # a config this version cannot read: keep the card it has
        card = None
    if card is not None:
        atomic_write(model_dir / "README.md", card)
    return push_model(model_dir, repo_id, private=private, run_dir=run_dir)
