"""The merge methods, on one tensor: pure functions of the deltas `d_i = theta_i - theta_base`.

A method is a row of `METHODS`, as in mergekit's generalized task arithmetic: a *sparsifier*
applied to each model's delta on its own, then a *consensus* that combines the sparsified deltas
into one.

    method            sparsify    consensus
    task_arithmetic   keep        weighted_sum   (Ilharco et al. 2023, "Editing Models with
                                                  Task Arithmetic")
    ties              magnitude   sign           (Yadav et al. 2023, "TIES-Merging",
                                                  arXiv 2306.01708)
    dare_linear       random      weighted_sum   (Yu et al. 2024, "Language Models are Super
    dare_ties         random      sign            Mario", arXiv 2311.03099)

A new method is one function (a sparsifier or a consensus) and one line in `METHODS`. The
method's name is checked against `METHODS` by `method_of`, before anything is read.

Precision: deltas and the result are float32. A difference of two bfloat16 or float16 values is
exact in float32 unless their magnitudes are more than ~2^15 apart, so a merge that reproduces a
source (weights (1, 0), say) gives it back bit for bit except at such entries, where it errs by at
most ~2^-22 * (|theta| + |theta_base|) (see test_parallel's bf16 test).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from unitune.config import MergeOptions
from unitune.merging.errors import MergeError


@dataclass(frozen=True)
class Where:
    """What a sparsifier may need besides the delta: the tensor's name, the model's index, its
    density (`models[i].density`, else the global one) and the merge options."""

    name: str
    index: int
    density: float
    opts: MergeOptions


Sparsify = Callable[[torch.Tensor, Where], torch.Tensor]
Consensus = Callable[[list[torch.Tensor], list[float], MergeOptions], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Sparsifiers: one delta at a time; they return a new tensor (or the same one, unchanged)


def keep(delta: torch.Tensor, where: Where) -> torch.Tensor:
    """No sparsification."""
    return delta


def magnitude(delta: torch.Tensor, where: Where) -> torch.Tensor:
    """TIES's trim to the model's `density` (see `trim`)."""
    return trim(delta, where.density)


def random(delta: torch.Tensor, where: Where) -> torch.Tensor:
    """DARE's random drop at `drop_rate`, seeded by `seed`, the tensor's name and the model's
    index (see `dare_drop`)."""
    o = where.opts
    return dare_drop(delta, o.drop_rate, seed=o.seed, name=where.name, index=where.index)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the `max(1, int(density * numel))` entries largest in magnitude.

    Entries of equal magnitude at the cut are kept lowest index first.
    """
    n = delta.numel()
    k = max(1, int(density * n))
    if density >= 1.0 or k >= n:
        return delta
    a = delta.abs().reshape(-1)
    cut = a.kthvalue(n - k + 1).values  # the k-th largest magnitude
    kept = a > cut
    missing = k - int(kept.sum())
    if missing > 0:  # entries equal to the cut fill the remaining places
        kept[(a == cut).nonzero().flatten()[:missing]] = True
    del a
    return delta * kept.view_as(delta)


def dare_mask(
    shape: torch.Size | tuple[int, ...], drop_rate: float, *, seed: int, name: str, index: int
) -> torch.Tensor:
    """DARE's keep mask (bool, True = kept with probability `1 - drop_rate`).

    Drawn from a `torch.Generator` seeded by a sha256 of (`seed`, `name`, `index`), so the same
    tensor of the same model always gets the same mask, whatever order the tensors come in.
    """
    key = f"{seed}\x00{name}\x00{index}".encode()
    gen = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    )
    return torch.rand(tuple(shape), generator=gen) >= drop_rate


def dare_drop(
    delta: torch.Tensor, drop_rate: float, *, seed: int, name: str, index: int
) -> torch.Tensor:
    """DARE: zero each entry with probability `drop_rate`, scale the rest by `1/(1-drop_rate)`."""
    if drop_rate == 0.0:
        return delta
    kept = dare_mask(delta.shape, drop_rate, seed=seed, name=name, index=index)
    return (delta * kept).div_(1.0 - drop_rate)


# --------------------------------------------------------------------------------------------
# Consensus: the sparsified deltas (owned: they may be modified) into one delta


def weighted_sum(ds: list[torch.Tensor], weights: list[float], opts: MergeOptions) -> torch.Tensor:
    """Task arithmetic: `sum_i w_i d_i`."""
    out = torch.zeros_like(ds[0])
    for w, d in zip(weights, ds, strict=True):
        out.add_(d, alpha=w)
    return out


def sign(ds: list[torch.Tensor], weights: list[float], opts: MergeOptions) -> torch.Tensor:
    """TIES's sign election and disjoint mean over the weighted deltas `u_i = w_i d_i`: elect
    each entry's sign as `sign(sum_i u_i)`, then average the nonzero `u_i` that agree with it,
    divided by their count (`normalize="count"`, the paper) or by the sum of their weights
    (`normalize="weight"`, mergekit's `normalize: true`). Entries with no agreeing value
    (including a zero sum) get 0."""
    total = torch.zeros_like(ds[0])
    for w, d in zip(weights, ds, strict=True):
        total.add_(d, alpha=w)
    positive, negative = total > 0, total < 0  # the elected sign; neither where the sum is 0
    num = total.zero_()
    den = torch.zeros_like(num)
    for w, d in zip(weights, ds, strict=True):
        u = d * w
        agree = ((u > 0) & positive) | ((u < 0) & negative)
        num.add_(u.mul_(agree))
        den.add_(agree, alpha=1.0 if opts.normalize == "count" else w)
        del u, agree
    den[den == 0] = 1.0  # no agreeing value: num is 0 (weights summing to 0: as mergekit)
    return num.div_(den)


# --------------------------------------------------------------------------------------------
# The table


class Method(NamedTuple):
    sparsify: Sparsify
    consensus: Consensus


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(keep, weighted_sum),
    "ties": Method(magnitude, sign),
    "dare_linear": Method(random, weighted_sum),
    "dare_ties": Method(random, sign),
}


def method_of(name: str) -> Method:
    """The row of `METHODS` named `name`; a one-line MergeError listing the known ones if none."""
    if name not in METHODS:
        raise MergeError(f"method {name!r}: unknown; known: {', '.join(METHODS)}")
    return METHODS[name]


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    opts: MergeOptions,
    *,
    densities: list[float] | None = None,
    name: str = "",
) -> torch.Tensor:
    """Merge one tensor's deltas `d_i = theta_i - theta_base` into one delta (float32), by the
    method `opts.method` names (`METHODS`). `densities[i]` overrides `opts.density` for model
    `i`; `name` seeds DARE's masks. A pure function: the inputs are not modified."""
    return combine_owned([d.float() for d in deltas], weights, opts, densities=densities, name=name)


def combine_owned(
    ds: list[torch.Tensor],
    weights: list[float],
    opts: MergeOptions,
    *,
    densities: list[float] | None = None,
    name: str = "",
) -> torch.Tensor:
    """`combine` on a list of float32 deltas that it owns: each entry is replaced by its
    sparsified version as it goes (no tensor is modified in place), so a caller that holds no
    other reference to a delta has it freed as soon as its replacement exists."""
    if not ds or len(ds) != len(weights):
        raise ValueError(f"combine: {len(ds)} deltas but {len(weights)} weights")
    if densities is not None and len(densities) != len(ds):
        raise ValueError(f"combine: {len(ds)} deltas but {len(densities)} densities")
    method = method_of(opts.method)
    for i in range(len(ds)):
        density = densities[i] if densities is not None else opts.density
        ds[i] = method.sparsify(ds[i], Where(name, i, density, opts))
    return method.consensus(ds, weights, opts)
