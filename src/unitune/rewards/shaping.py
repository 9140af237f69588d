"""Shaping of the combined reward, in this order on the training side: `missing_eos`, `clip`, then
for an objective that fits scores in [0, 1] (UNA) `una_map`. Pure functions on float64 `[N]`
tensors, plus `RunningStats`, the one piece of state (`zscore`'s), saved whole in checkpoints.

A NaN reward (no reward function scored the sample) stays NaN through every step, so it stays
out of every later statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

UnaMap = Literal["sigmoid", "minmax", "zscore", "none"]
UNA_MAPS = ("sigmoid", "minmax", "zscore", "none")


def missing_eos(rewards: Tensor, truncated: Tensor, penalty: float | None) -> Tensor:
    """`rewards - penalty` for the completions cut at `max_new_tokens` before an EOS
    (`truncated`, bool `[N]`), the others as they are; no penalty when `penalty` is None.

    TRL's `missing_eos_penalty` (OnlineDPOTrainer: `scores[~contain_eos_token] -= penalty`);
    the UNA authors' online run (UNA-UFT `Mistral-online/una_peft.py`) sets it to 1.0 and
    subtracts it before the sigmoid map.
    """
    if truncated.shape != rewards.shape:
        raise ValueError(
            f"missing_eos: truncated {tuple(truncated.shape)} for {tuple(rewards.shape)}"
        )
    if not penalty:
        return rewards.clone()
    return rewards - penalty * truncated.to(rewards.dtype)


def clip(rewards: Tensor, lo: float | None = None, hi: float | None = None) -> Tensor:
    """The rewards clamped to `[lo, hi]` (either bound may be None); NaN stays NaN
    (`torch.clamp` propagates it). Reward clipping as OpenRLHF's `reward_clip_range`."""
    if lo is None and hi is None:
        return rewards.clone()
    return torch.clamp(rewards, min=lo, max=hi)


class RunningStats:
    """Running count, mean and variance of every reward seen (float64, NaN ignored), merged one
    batch at a time by the parallel update of Chan, Golub & LeVeque (1979): with the batch's
    count `n_b`, mean `m_b` and sum of squared deviations `M2_b`,
    `delta = m_b - mean`, `mean += delta * n_b / n`, `M2 += M2_b + delta^2 * count * n_b / n`.
    `std` is the population standard deviation `sqrt(M2 / count)` (as OpenAI baselines'
    `RunningMeanStd`). Feed it the rewards of the whole generation batch gathered from every
    process, so that all processes hold the same state.

    `state_dict()` is plain JSON (an int and two floats, which JSON writes and reads back
    exactly), so a resumed run continues from the same figures bit for bit.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, values: Tensor | Sequence[float]) -> None:
        v = torch.as_tensor(values, dtype=torch.float64).flatten()
        v = v[~torch.isnan(v)]
        n_b = int(v.numel())
        if n_b == 0:
            return
        mean_b = float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def mean(self) -> float:
        """The mean of every value seen; NaN before any."""
        return self._mean if self.count else math.nan

    @property
    def std(self) -> float:
        """The population standard deviation of every value seen; NaN before any."""
        return math.sqrt(self._m2 / self.count) if self.count else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"RunningStats state lacks {', '.join(sorted(missing))}")
        self.count = int(state["count"])
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])


def una_map(
    rewards: Tensor,
    how: UnaMap,
    range: tuple[float, float] | None = None,  # noqa: A002 (the config's name: score_range)
    stats: RunningStats | None = None,
    *,
    std_floor: float = 1e-4,
    update: Tensor | None = None,
) -> Tensor:
    """The rewards mapped to [0, 1], the score `s` online UNA regresses `sigma(beta * r)` onto
    (UNA, arXiv 2408.15339, Eq. 9: the explicit reward must lie in [0, 1]).

    - `sigmoid`: `sigma(R)`, as the authors' online code maps the reward model's raw score
      (UNA-UFT `Mistral-online/una_peft.py`: `torch.sigmoid(score)`);
    - `minmax`: `(R - lo) / (hi - lo)` over the declared `range = (lo, hi)`, clamped to [0, 1],
      as the paper normalises a bounded score;
    - `zscore`: `sigma((R - mean) / max(std, std_floor))` with the running mean and std of
      `stats`, updated first (as OpenAI baselines' `VecNormalize` updates its running
      statistics before normalising) with `update` (default: `rewards`; on several processes
      pass the whole generation batch gathered from all of them, so every process holds the
      same statistics);
    - `none`: the rewards as they are (for rewards already in [0, 1]: `format`, `judge:demo`).

    NaN stays NaN.
    """
    if how == "sigmoid":
        return torch.sigmoid(rewards)
    if how == "minmax":
        if range is None or not range[0] < range[1]:
            raise ValueError(f"una_map minmax needs range = (lo, hi) with lo < hi, got {range}")
        lo, hi = range
        return torch.clamp((rewards - lo) / (hi - lo), 0.0, 1.0)
    if how == "zscore":
        if stats is None:
            raise ValueError("una_map zscore needs the RunningStats to update")
        stats.update(rewards if update is None else update)
        return torch.sigmoid((rewards - stats.mean) / max(stats.std, std_floor))
    if how == "none":
        return rewards.clone()
    raise ValueError(f"una_map: unknown map {how!r}; expected one of {', '.join(UNA_MAPS)}")


def shape(
    rewards: Tensor,
    truncated: Tensor,
    *,
    missing_eos_penalty: float | None = None,
    clip_range: tuple[float, float] | None = None,
    score_map: UnaMap = "none",
    score_range: tuple[float, float] | None = None,
    stats: RunningStats | None = None,
    update: Tensor | None = None,
) -> Tensor:
    """The combined rewards shaped in order: `missing_eos`, `clip` to `clip_range`, then
    `una_map` with `score_map` (the config's `online.missing_eos_penalty`, `reward_clip`,
    `score_map`, `score_range`; the penalty comes before the map, as in the UNA authors'
    code). `update`: what zscore's statistics are updated with (see `una_map`)."""
    out = missing_eos(rewards, truncated, missing_eos_penalty)
    if clip_range is not None:
        out = clip(out, *clip_range)
    return una_map(out, score_map, score_range, stats, update=update)
