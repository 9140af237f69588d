"""Objectives by name. Adding one is one function plus one `register(...)` line.

The function takes `SeqLogps` (SFT family, on demonstrations) or `PairLogps` (preference family,
on pairs) and keyword-only hyper-parameters with defaults; the config model for those
hyper-parameters is derived from the signature, so unknown or mistyped keys are config errors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, create_model
from torch import Tensor

Kind = Literal["sft", "pref"]


@dataclass(frozen=True)
class Objective:
    name: str
    kind: Kind  # "sft": demonstrations; "pref": preference pairs
    fn: Callable[..., Tensor]
    params: type[BaseModel]
    needs_ref: bool  # needs reference log-probs (cached before training)
    source: str

    def loss(self, logps, params: BaseModel | None = None) -> Tensor:
        p = params if params is not None else self.params()
        return self.fn(logps, **p.model_dump())

    @property
    def defaults(self) -> dict:
        return self.params().model_dump()


REGISTRY: dict[str, Objective] = {}


def register(fn: Callable[..., Tensor], *, name: str, kind: Kind, needs_ref: bool, source: str):
    fields = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            fields[p.name] = (type(p.default) if p.default is not None else float, p.default)
    params = create_model(
        f"{name}_params", __config__=ConfigDict(extra="forbid", strict=False), **fields
    )
    REGISTRY[name] = Objective(name, kind, fn, params, needs_ref, source)
    return fn
