"""A model's train/eval mode and its dropout.

`disable_dropout` (`model.disable_dropout`, default true, as TRL's `disable_dropout=True`): the
cached reference log-probs are computed in eval mode, so a policy trained with dropout on has
`log pi - log pi_ref != 0` at step 0, and a padded and a packed run of the same config draw
different masks and end in different weights. With dropout off, train mode computes exactly what
eval mode does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """`model` in eval mode for the block, then back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or "pdrop" in name


def _zero_float_attrs(obj: Any) -> None:
    for key, value in list(vars(obj).items()):
        if _is_dropout_name(key) and isinstance(value, float) and value != 0.0:
            setattr(obj, key, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Turn every dropout of `model` off: each `nn.Dropout`-like module gets `p = 0`, and every
    float attribute named like a dropout rate (`attention_dropout`, `hidden_dropout`,
    `resid_pdrop`, ...) is set to 0.0, on the modules (some models keep the rate as a float and
    call `F.dropout` or pass it to the attention kernel) and on the config and its text config
    (some read it there at forward time, e.g. Falcon's `hidden_dropout`)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_float_attrs(module)
    config = getattr(model, "config", None)
    if config is not None:
        _zero_float_attrs(config)
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else None
        if text is not None and text is not config:
            _zero_float_attrs(text)
