"""`TrainState`: everything that changes during a run, saved whole in every checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from unitune.schedules.registry import Schedule
from unitune.training.batches import BatchStream


@dataclass
class TrainState:
    """Everything that changes during a run. `state_dict()` is JSON (Python's RNG included);
    `tensors()` the torch RNG states and the rollout buffers saved beside it; the optimizer and
    the LR scheduler are saved by `checkpoint.save_checkpoint`."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Schedule
    streams: dict[str, BatchStream]
    step: int = 0  # optimizer steps done
    steps: dict[str, int] = field(default_factory=lambda: {"sft": 0, "pref": 0})
    tokens: int = 0
    skipped: list[int] = field(default_factory=list)  # steps skipped for a non-finite value
    reference_fp: str | None = None  # sequential: the switched reference's fingerprint
    reference_step: int | None = None  # ... and the step whose checkpoint holds that model
    last_eval: dict[str, Any] = field(default_factory=dict)
    metrics_lines: int = 0
    train_s: float = 0.0  # training time of earlier sessions of this run
    eval_s: float = 0.0  # time spent in held-out evaluations so far (all sessions)
    # the online slot (training/online.py): its buffer, prompt stream and reward statistics
    online: Any = None

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        return {
            "step": self.step,
            "steps": dict(self.steps),
            "tokens": self.tokens,
            "skipped": list(self.skipped),
            "reference_fp": self.reference_fp,
            "reference_step": self.reference_step,
            "last_eval": self.last_eval,
            "metrics_lines": self.metrics_lines,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "schedule": self.schedule.state_dict(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "python_rng": [version, list(internal), gauss],
            # a collective with several processes: every process calls `state_dict()`
            **({"online": self.online.state_dict()} if self.online is not None else {}),
        }

    @staticmethod
    def rng_tensors() -> dict[str, torch.Tensor]:
        """torch's RNG states (CPU, and CUDA where there is one)."""
        tensors = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["cuda_rng"] = torch.cuda.get_rng_state()
        return tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        """`rng_tensors()` and the online slot's rollout buffers, saved beside `state_dict()`
        (a collective, as `state_dict()`)."""
        tensors = self.rng_tensors()
        if self.online is not None:
            tensors |= self.online.tensors()
        return tensors

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict()` and `tensors()` as a checkpoint saved them."""
        for key in ("step", "tokens", "reference_fp", "reference_step", "metrics_lines"):
            setattr(self, key, state[key])
        self.steps, self.skipped = dict(state["steps"]), list(state["skipped"])
        self.last_eval, self.train_s = dict(state["last_eval"]), float(state["train_s"])
        self.eval_s = float(state.get("eval_s", 0.0))  # absent in checkpoints of 0.1.0
        self.schedule.load_state_dict(state["schedule"])
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])
        if self.online is not None:
            self.online.load_state_dict(state["online"], tensors)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(tensors["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["cuda_rng"])
