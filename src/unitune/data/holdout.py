"""Hold out part of a dataset for evaluation when no eval file is given."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_holdout(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic shuffle-split into (train, eval); eval gets at least one item.

    Both parts keep the items' original order. Items over a token store come back as views
    (`Items.take`), their tokens not copied.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(items) < 2:
        raise ValueError(f"need at least 2 items to hold some out, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * fraction)), len(items) - 1)
    held = set(order[:n_eval])
    if hasattr(items, "take"):
        keep = [i for i in range(len(items)) if i not in held]
        return items.take(keep), items.take(sorted(held))
    train = [item for i, item in enumerate(items) if i not in held]
    evaluation = [item for i, item in enumerate(items) if i in held]
    return train, evaluation
