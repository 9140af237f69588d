"""Several rewards at once, with weights: `build_rewards` reads the specs, `Rewards.score` calls
every reward on a batch of decoded completions, checks what each returned, and combines them.

What a reward function is given (TRL 1.16 `GRPOTrainer._calculate_rewards`, by keyword):

- `prompts`: the prompts as the data has them (a string, or a list of messages);
- `completions`: the decoded completion text when the prompt is a string, and
  `[{"role": "assistant", "content": text}]` when it is a conversation (TRL's forms);
- `completion_ids`: the policy's completion token ids, as the caller gives them;
- every other column of the prompt record, one value per completion (`prompt`, `completion`
  and `completion_ids` columns left out, as TRL does);
- `trainer_state`: a `RewardProgress` (`global_step`, `max_steps`) where TRL gives its whole
  `TrainerState`; `log_extra(column, values)` and `log_metric(name, value)`, collected into
  `RewardScores.logged_columns` / `logged_metrics`. TRL's `environments` is not passed.

What it must return: one value per completion, each a real number (`int`, `float`, `bool` as
1.0 / 0.0 as TRL's tensor conversion reads it, a NumPy or 0-d tensor scalar) or `None` when it
cannot score that completion. NaN and infinities are refused, not read as None: return None for
an unscorable completion. Anything else stops the run with a `RewardError` naming the reward
and the record (`records[i]`). When a Python function raises, it is called again on each sample
alone to find the record it fails on (reward models and judges are not: their failure names the
batch).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unitune.judges.base import DEFAULT_KEY_ENV
from unitune.models.source import first_line
from unitune.rewards.base import (
    RESERVED_COLUMNS,
    Prompt,
    RewardError,
    RewardFn,
    RewardProgress,
    RewardScores,
    RewardSpecError,
    as_trl_completion,
)
from unitune.rewards.programmatic import PROGRAMMATIC
from unitune.rewards.specs import (
    call_reward,
    expected_forms,
    judge_reward,
    load_function,
    load_judge,
    load_rm,
    parse_reward_spec,
    rm_reward,
    spec_error,
)


@dataclass(frozen=True)
class Reward:
    """One reward of a `Rewards`: its spec, its name in `RewardScores.per_function` and the logs
    (the spec, made unique), its weight, the function, and whether a failure may be located by
    calling the function on each sample alone (Python functions only)."""

    spec: str
    name: str
    weight: float
    fn: RewardFn
    locate: bool = True


class Rewards:
    """Reward functions with weights: `score` gives each one's values and the weighted sum."""

    def __init__(self, rewards: Sequence[Reward], *, label: str = "online.rewards") -> None:
        if not rewards:
            raise RewardSpecError(f"{label}: no rewards")
        self.rewards = list(rewards)
        self.label = label

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards]

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: dict[str, Sequence[Any]],
        records: Sequence[str],
        *,
        step: int = 0,
        max_steps: int = 0,
    ) -> RewardScores:
        """Every reward's values on N samples and their combination.

        `completions` is the decoded text (TRL decodes with `skip_special_tokens=True`);
        `columns[k][i]` is sample i's value of the record column k; `records[i]` names sample
        i's record in errors ("prompts.jsonl: line 7"); `step` / `max_steps` reach the functions
        as `trainer_state`. A `RewardError` (one line) when a reward fails.
        """
        n = len(completions)
        given = {"prompts": prompts, "completion_ids": completion_ids, "records": records}
        given.update({f"columns[{k!r}]": v for k, v in columns.items()})
        for what, seq in given.items():
            if len(seq) != n:
                raise ValueError(f"Rewards.score: {len(seq)} {what} for {n} completions")
        trl_completions = [
            as_trl_completion(p, c) for p, c in zip(prompts, completions, strict=True)
        ]
        metrics: dict[str, list[float]] = defaultdict(list)
        extra: dict[str, list[Any]] = defaultdict(list)
        common = {
            "trainer_state": RewardProgress(step, max_steps),
            "log_extra": lambda column, values: extra[column].extend(values),
            "log_metric": lambda name, value: metrics[name].append(float(value)),
        }
        batch = Batch(list(prompts), trl_completions, completion_ids, columns, list(records))
        per_function: dict[str, list[float | None]] = {}
        for reward in self.rewards:
            per_function[reward.name] = self.run(reward, batch, common)
        combined = torch.full((n,), math.nan, dtype=torch.float64)
        for i in range(n):
            scored = [
                r.weight * per_function[r.name][i]  # type: ignore[operator]
                for r in self.rewards
                if per_function[r.name][i] is not None
            ]
            if scored:
                combined[i] = math.fsum(scored)
        return RewardScores(per_function, combined, dict(metrics), dict(extra))

    def run(self, reward: Reward, batch: Batch, common: dict[str, Any]) -> list[float | None]:
        """One reward's checked values on the batch."""
        try:
            out = batch.call(reward.fn, common)
        except Exception as err:
            raise self.failure(reward, batch, err, common) from None
        return self.check(reward, out, batch.records)

    def failure(
        self, reward: Reward, batch: Batch, err: Exception, common: dict[str, Any]
    ) -> RewardError:
        """The error for a reward that raised on the batch: naming the first record it raises on
        alone (Python functions), else the batch."""
        if reward.locate and len(batch.records) > 1:
            quiet = {**common, "log_extra": lambda *_: None, "log_metric": lambda *_: None}
            for i, record in enumerate(batch.records):
                try:
                    batch.sample(i).call(reward.fn, quiet)
                except Exception as single:
                    return self.error(reward, record, f"raised {describe(single)}")
        return self.error(reward, None, f"raised {describe(err)}", batch.records)

    def check(self, reward: Reward, out: Any, records: list[str]) -> list[float | None]:
        """A reward's output as floats and Nones, or the `RewardError` saying what is wrong."""
        n = len(records)
        if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:
            out = out.tolist()  # a 1-D tensor or array
        if isinstance(out, (str, bytes, dict)) or not isinstance(out, Iterable):
            problem = f"returned a {type(out).__name__}, not a list of {n} numbers"
            raise self.error(reward, None, problem, records)
        out = list(out)
        if len(out) != n:
            raise self.error(
                reward, None, f"returned {len(out)} values for {n} completions", records
            )
        values: list[float | None] = []
        for value, record in zip(out, records, strict=True):
            if value is None:
                values.append(None)
                continue
            number = as_number(value)
            if number is None:
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise self.error(
                    reward,
                    record,
                    f"returned {shown} ({type(value).__name__}), not a number; return a float, "
                    "or None for a completion it cannot score",
                )
            if not math.isfinite(number):
                raise self.error(
                    reward,
                    record,
                    f"returned {number}, not a finite number; return None for a completion it "
                    "cannot score",
                )
            values.append(number)
        return values

    def error(
        self,
        reward: Reward,
        record: str | None,
        problem: str,
        records: Sequence[str] | None = None,
    ) -> RewardError:
        """`online.rewards: reward 'SPEC' on RECORD: PROBLEM`; a failure of the whole batch
        names its first and last records."""
        if record is None and records is not None and len(records) == 1:
            record = records[0]
        if record is not None:
            where = f"on {record}"
        elif records:
            where = f"on the batch {records[0]} .. {records[-1]} ({len(records)} completions)"
        else:
            where = "on an empty batch"
        return RewardError(
            f"{self.label}: reward {reward.spec!r} {where}: {problem}",
            reward=reward.spec,
            record=record,
        )


@dataclass
class Batch:
    """What every reward of one `score` call is given (TRL's forms)."""

    prompts: list[Prompt]
    completions: list[Any]
    completion_ids: Sequence[Sequence[int]]
    columns: dict[str, Sequence[Any]]
    records: list[str]

    def call(self, fn: RewardFn, common: dict[str, Any]) -> Any:
        """`fn` by keyword as TRL calls it, on fresh lists (one reward cannot change what the
        next one is given)."""
        columns = {k: list(v) for k, v in self.columns.items() if k not in RESERVED_COLUMNS}
        return call_reward(
            fn,
            prompts=list(self.prompts),
            completions=list(self.completions),
            completion_ids=self.completion_ids,
            **columns,
            **common,
        )

    def sample(self, i: int) -> Batch:
        return Batch(
            self.prompts[i : i + 1],
            self.completions[i : i + 1],
            self.completion_ids[i : i + 1],
            {k: v[i : i + 1] for k, v in self.columns.items()},
            self.records[i : i + 1],
        )


def describe(err: BaseException) -> str:
    text = first_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def as_number(value: Any) -> float | None:
    """A reward value as a float: a real number (bools as 1.0 / 0.0, NumPy scalars), a 0-d
    tensor or array of one; None for anything else (a string, a list, a complex number)."""
    if isinstance(value, numbers.Real):  # int, float, bool, NumPy integers and floats
        return float(value)
    if type(value).__name__ == "bool_":  # NumPy's bool is no numbers.Real
        return float(bool(value))
    if hasattr(value, "ndim") and hasattr(value, "item") and value.ndim == 0:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None


def build_rewards(
    specs: Sequence[tuple[str, float] | str],
    *,
    trust_remote_code: bool = False,
    device: str | None = None,
    judge_url: str | None = None,
    judge_key_env: str = DEFAULT_KEY_ENV,
    batch_size: int = 8,
    label: str = "online.rewards",
) -> Rewards:
    """The rewards `specs` name, with their weights (a plain spec has weight 1), ready to score:
    Python functions imported, reward models and judges loaded (on `device`, default CUDA when
    there is one; reward models score `batch_size` texts at once). Every problem is a one-line
    `RewardSpecError` naming the spec (forms: `specs.py`)."""
    if not specs:
        raise RewardSpecError(f"{label}: no rewards; give at least one of {expected_forms()}")
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for item in specs:
        spec, weight = (item, 1.0) if isinstance(item, str) else item
        parsed = parse_reward_spec(spec, label=label)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise spec_error(label, parsed.spec, f"weight {weight!r} is not a number")
        if not math.isfinite(weight):
            raise spec_error(label, parsed.spec, f"weight {weight} is not a finite number")
        models = {
            "trust_remote_code": trust_remote_code,
            "device": device,
            "batch_size": batch_size,
        }
        locate = True
        if parsed.kind in ("module", "file"):
            fn = load_function(parsed, label)
        elif parsed.kind == "rm":
            fn, locate = rm_reward(load_rm(parsed, label, **models)), False
        elif parsed.kind == "judge":
            judge = load_judge(
                parsed, label, judge_url=judge_url, judge_key_env=judge_key_env, **models
            )
            fn, locate = judge_reward(judge), False
        else:
            fn = PROGRAMMATIC[parsed.kind].make(parsed.argument)
        seen[parsed.spec] = seen.get(parsed.spec, 0) + 1
        name = parsed.spec if seen[parsed.spec] == 1 else f"{parsed.spec}#{seen[parsed.spec]}"
        rewards.append(Reward(parsed.spec, name, float(weight), fn, locate))
    return Rewards(rewards, label=label)
