"""Objectives by name. Adding one is one function plus one `register(...)` line.

The function takes the log-probs of its data kind — `SeqLogps` (demonstrations), `PairLogps`
(preference pairs), `FeedbackLogps` (unpaired feedback: labels or scores), or `TokenLogps` when it
declares its own `forward` (IFT) — and keyword-only hyper-parameters with defaults; the config
model for those hyper-parameters is derived from the signature and its type hints, so unknown or
mistyped keys are config errors.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, create_model
from torch import Tensor

from unitune.objectives.types import FeedbackLogps, PairLogps, SeqLogps

Kind = Literal["sft", "pref"]
Data = Literal["demonstrations", "pairs", "unpaired"]


@dataclass(frozen=True)
class Objective:
    name: str
    kind: Kind  # "sft": demonstrations; "pref": preference pairs
    fn: Callable[..., Tensor]
    params: type[BaseModel]
    needs_ref: bool  # needs reference log-probs (cached before training)
    source: str
    data: Data = "demonstrations"
    # custom model pass producing the loss's inputs, e.g. IFT's two passes:
    # forward(model, input_ids, attention_mask, target_mask, *, chunk_size, **params) -> TokenLogps
    forward: Callable | None = None
    summary: str = ""  # one-line formula for `unitune objectives`
    # auxiliary inputs the objective consumes, by name (`batches.AUX_INPUTS`); each fills the
    # field of that name of its log-prob bundle, e.g. "kl": KTO's mismatched pairs
    inputs: tuple[str, ...] = ()
    # unpaired: trains on binary labels (desirable / undesirable), so score data is refused unless
    # `data.pref.label_threshold` turns it into labels at load time
    needs_labels: bool = False

    def loss(self, logps, params: BaseModel | None = None) -> Tensor:
        p = params if params is not None else self.params()
        return self.fn(logps, **p.model_dump())

    @property
    def defaults(self) -> dict:
        return self.params().model_dump()


REGISTRY: dict[str, Objective] = {}


def register(
    fn: Callable[..., Tensor],
    *,
    name: str,
    data: Data,
    needs_ref: bool,
    source: str,
    summary: str = "",
    forward: Callable | None = None,
    inputs: tuple[str, ...] = (),
    needs_labels: bool = False,
) -> Callable[..., Tensor]:
    """Register `fn` under `name`; its keyword-only arguments become validated config keys."""
    hints = typing.get_type_hints(fn)
    fields = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            fields[p.name] = (hints.get(p.name, type(p.default)), p.default)
    params = create_model(
        f"{name}_params", __config__=ConfigDict(extra="forbid", strict=False), **fields
    )
    kind: Kind = "sft" if data == "demonstrations" else "pref"
    bundle = {"demonstrations": SeqLogps, "pairs": PairLogps, "unpaired": FeedbackLogps}[data]
    unknown = [i for i in inputs if i not in {f.name for f in dataclasses.fields(bundle)}]
    if unknown:  # an auxiliary input fills the bundle's field of its name
        raise ValueError(f"{name}: {bundle.__name__} has no field for inputs {unknown}")
    REGISTRY[name] = Objective(
        name, kind, fn, params, needs_ref, source, data, forward, summary, inputs, needs_labels
    )
    return fn
