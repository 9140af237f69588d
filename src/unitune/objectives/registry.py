"""Objectives by name. Adding one is one function plus one `register(...)` line.

The function takes the log-probs of its data kind — `SeqLogps` (demonstrations), `PairLogps`
(preference pairs), `FeedbackLogps` (unpaired feedback: labels or scores), `RolloutLogps` (prompts:
an online objective on the policy's own samples, scored by rewards), or `TokenLogps` when it
declares its own `forward` (IFT) — and keyword-only hyper-parameters with defaults; the config
model for those hyper-parameters is derived from the signature and its type hints, so unknown or
mistyped keys are config errors.

Each objective declares the facts that the config and the trainer ask of it: its `slot` (`sft` or
`pref`, from its data kind), and `metric`, the held-out metric its own loss equals (`f_sft`,
`f_pref`) or None. An objective with a `beta` equals its metric only at `beta == eval.beta`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, create_model
from torch import Tensor

from unitune.objectives.types import FeedbackLogps, PairLogps, RolloutLogps, SeqLogps

Slot = Literal["sft", "pref"]
Data = Literal["demonstrations", "pairs", "unpaired", "prompts"]
Metric = Literal["f_sft", "f_pref"]
SLOT_OF_DATA: dict[str, Slot] = {
    "demonstrations": "sft", "pairs": "pref", "unpaired": "pref", "prompts": "pref",
}  # fmt: skip
BUNDLE_OF_DATA: dict[str, type] = {
    "demonstrations": SeqLogps, "pairs": PairLogps, "unpaired": FeedbackLogps,
    "prompts": RolloutLogps,
}  # fmt: skip


@dataclass(frozen=True)
class Objective:
    name: str
    slot: Slot  # "sft": demonstrations; "pref": pairs, unpaired feedback or prompts (online)
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
    # the held-out metric this objective's loss equals (docs/methods.md, "Held-out metrics"), at
    # `beta == eval.beta` when it has a `beta`; None: its own loss is reported as `loss_<name>`
    metric: Metric | None = None
    # hyper-parameters renamed since an earlier release, old -> new: the old key in a config is
    # an error naming the new one
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    # online (data "prompts"): the samples per prompt G it takes by default (`online.
    # num_generations` overrides), the fewest it can learn from (a pair needs two), and whether it
    # fits rewards mapped to [0, 1] (UNA's score map applies); None / 1 / False offline
    generations: int | None = None
    min_generations: int = 1
    unit_rewards: bool = False

    def loss(self, logps, params: BaseModel | None = None) -> Tensor:
        p = params if params is not None else self.params()
        return self.fn(logps, **p.model_dump())

    @property
    def defaults(self) -> dict:
        return self.params().model_dump()

    def equals_metric(self, params: BaseModel, eval_beta: float) -> bool:
        """Whether this objective, with `params`, trains on exactly its held-out metric."""
        if self.metric is None:
            return False
        return getattr(params, "beta", eval_beta) == eval_beta


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
    metric: Metric | None = None,
    renamed: dict[str, str] | None = None,
    generations: int | None = None,
    min_generations: int = 1,
    unit_rewards: bool = False,
) -> Callable[..., Tensor]:
    """Register `fn` under `name`; its keyword-only arguments become validated config keys.

    An online objective (`data="prompts"`) declares `generations`, its default samples per prompt
    G, and `min_generations` when it compares samples of a prompt; `unit_rewards` when it fits
    rewards in [0, 1]."""
    hints = typing.get_type_hints(fn)
    fields = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            fields[p.name] = (hints.get(p.name, type(p.default)), p.default)
    params = create_model(
        f"{name}_params", __config__=ConfigDict(extra="forbid", strict=False), **fields
    )
    slot = SLOT_OF_DATA[data]
    if metric is not None and metric != f"f_{slot}":
        raise ValueError(f"{name}: a {slot} objective cannot equal {metric}")
    if (data == "prompts") != (generations is not None):
        raise ValueError(f"{name}: generations (samples per prompt) is for, and required by, "
                         "an objective on prompts")  # fmt: skip
    if generations is not None and not 1 <= min_generations <= generations:
        raise ValueError(f"{name}: min_generations {min_generations} must be in [1, {generations}]")
    bundle = BUNDLE_OF_DATA[data]
    unknown = [i for i in inputs if i not in {f.name for f in dataclasses.fields(bundle)}]
    if unknown:  # an auxiliary input fills the bundle's field of its name
        raise ValueError(f"{name}: {bundle.__name__} has no field for inputs {unknown}")
    REGISTRY[name] = Objective(
        name, slot, fn, params, needs_ref, source, data=data, forward=forward, summary=summary,
        inputs=inputs, needs_labels=needs_labels, metric=metric, renamed=renamed or {},
        generations=generations, min_generations=min_generations, unit_rewards=unit_rewards,
    )  # fmt: skip
    return fn


# the objective a config's slot gets when it names none
DEFAULT_OBJECTIVE: dict[Slot, str] = {"sft": "sft", "pref": "dpo"}


def renamed_problem(name: str, keys: Iterable[str]) -> str | None:
    """An error naming the new key when `keys` holds a renamed hyper-parameter of `name`."""
    old = [k for k in keys if k in REGISTRY[name].renamed]
    if not old:
        return None
    return "; ".join(f"{k}: renamed {REGISTRY[name].renamed[k]!r} ({name})" for k in old)


def slot_problem(name: str, slot: str) -> str | None:
    """What is wrong with objective `name` in config slot `slot`, or None."""
    if name not in REGISTRY:
        return f"unknown objective {name!r}; known: {', '.join(sorted(REGISTRY))}"
    obj = REGISTRY[name]
    if obj.slot != slot:
        fits = sorted(n for n, o in REGISTRY.items() if o.slot == slot)
        return (
            f"{name!r} is a {obj.slot} objective (it trains on {obj.data}), not a {slot} one; "
            f"{slot} objectives: {', '.join(fits)}"
        )
    return None
