"""Secrets kept out of everything unitune writes or prints: tracker configs, model cards, error
messages.

A secret is the value of a credential-like environment variable (`HF_TOKEN`, `WANDB_API_KEY`, any
name ending in `KEY`, `TOKEN`, `SECRET` or `PASSWORD`), or anything shaped like a Hugging Face
token (`hf_` and 30+ letters and digits). `redact` replaces each with `***`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
_MIN_LEN = 6  # shorter values ("1", "true") are not worth masking and would mangle text


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the credential-like variables of `environ` (default `os.environ`), longest
    first (so that a secret containing another is masked whole)."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_LEN}
    return sorted(found, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret replaced by `***`."""
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return _HF_TOKEN.sub(MASK, text)


def redact_values(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """`data` (dicts, lists, strings, scalars) with every string redacted."""
    if isinstance(data, str):
        return redact(data, environ)
    if isinstance(data, Mapping):
        return {k: redact_values(v, environ) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_values(v, environ) for v in data)
    return data
