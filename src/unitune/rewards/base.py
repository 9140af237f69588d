"""What a reward is: TRL's reward-function signature, the two errors, the scores of a batch.

A reward function, as TRL's `GRPOTrainer` / `RLOOTrainer` call it (TRL 1.16,
`trainer/grpo_trainer.py`, `_calculate_rewards`):

    f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

one value per completion, `None` where the function cannot score it (left out of the combination
and of every normalisation). Every reward of unitune (Python functions, reward models, judges,
the programmatic ones) is called this way, so a TRL user's function works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Prompt = str | list[dict[str, Any]]
# what a reward function receives as one completion: the text for a plain-string prompt, a list
# of one assistant message for a conversational one (as TRL)
Completion = str | list[dict[str, Any]]
RewardFn = Callable[..., Sequence[Any]]

# columns of a record that are never given to a reward function as keyword arguments (TRL
# leaves them out too: the prompt and the completion are passed by name already)
RESERVED_COLUMNS = ("prompt", "completion", "completion_ids")


class RewardSpecError(ValueError):
    """A reward spec that cannot be used (unknown kind, bad syntax, module or function not found,
    a reward model that is not a one-output classifier, a pairwise judge): one line naming the
    spec, raised before anything trains."""


class RewardError(RuntimeError):
    """A reward that failed while scoring (raised, wrong count, not a number): one line naming
    the reward and the record; `reward` is the spec, `record` the record id (None when the
    failure is the whole batch's)."""

    def __init__(self, message: str, *, reward: str, record: str | None = None) -> None:
        super().__init__(message)
        self.reward = reward
        self.record = record


@dataclass(frozen=True)
class RewardProgress:
    """What a reward function gets as `trainer_state` (TRL passes its `TrainerState` "for
    dynamic reward shaping based on training progress"): the optimizer step about to be taken
    and the run's last step. Only these two of TrainerState's fields exist here."""

    global_step: int = 0
    max_steps: int = 0


@dataclass
class RewardScores:
    """The rewards of one batch.

    `per_function`: each reward's raw values by name (None: not scored). `combined`: float64
    `[N]`, `sum_k w_k r_k` over the rewards that scored the sample, NaN when none did (TRL 1.16
    `_generate_and_score_completions`: `nansum` over the weighted rewards, then NaN for a row
    every function left out, so an unscorable sample is not a 0). `logged_metrics` and
    `logged_columns`: what the functions passed to TRL's `log_metric(name, value)` and
    `log_extra(column, values)` while scoring this batch.
    """

    per_function: dict[str, list[float | None]]
    combined: torch.Tensor
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)
    logged_columns: dict[str, list[Any]] = field(default_factory=dict)


def completion_text(completion: Completion) -> str:
    """The text of a completion in either of TRL's forms: the string itself, or the content of
    the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def as_trl_completion(prompt: Prompt, text: str) -> Completion:
    """A completion as TRL gives it to reward functions: the decoded text when the prompt is a
    plain string, `[{"role": "assistant", "content": text}]` when it is a conversation (TRL 1.16
    `_generate`, without a tokenizer response schema)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
