"""One run's accelerator and engine, model, tokenizer and data, and the inputs its objectives read.

`Session(cfg)` is built whole by its constructor: Accelerate's state for the run's precision and
engine, the model (and its log-prob wrapper `PolicyLogps`, not yet prepared), the validated and
tokenized data, each slot's objective with its parameters and split, and the objectives'
auxiliary inputs (KTO's mismatched pairs) over fixed partitions of the batches. What the run
computes from it lives beside it: the reference log-probs (`reference_set.py`), the policy being
trained (`policy.py`), held-out evaluation (`evaluator.py`), generation (`generation.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from torch import nn

from unitune.config import Config
from unitune.core.io import cache_dir
from unitune.data import length_batches
from unitune.models.fingerprint import model_fingerprint, weights_fingerprint
from unitune.models.load import enable_gradient_checkpointing, load_model
from unitune.models.probe import check_logprobs
from unitune.objectives import REGISTRY
from unitune.training import engines
from unitune.training.batches import AUX_INPUTS, item_length, load_data
from unitune.training.policy import PolicyLogps
from unitune.training.references import Shard
from unitune.training.rundir import report_data

Poll = Callable[[], None]  # called between batches of long passes; raises to stop (SIGTERM)


class Session:
    """A run's accelerator, engine, model, data and objective inputs, built whole."""

    def __init__(self, cfg: Config, console: Console | None = None, *, poll: Poll | None = None):
        self.cfg, self.console, self.poll = cfg, console or Console(), poll
        self.cache_dir = cache_dir(cfg.cache_dir)
        self.out = Path(cfg.output_dir)
        set_seed(cfg.train.seed)
        # Accelerate keeps one process-wide state and refuses a second Accelerator with another
        # precision; a later run in the same process (a sweep, the demo, a notebook) may differ.
        # The distributed part (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = engines.accelerator(cfg)
        self.engine = engines.Engine.of(self.acc)
        engines.check(cfg, self.engine)
        engines.fill_deepspeed(cfg, self.acc)
        ev = cfg.eval
        for key, wanted in (("generate", ev.generate), ("retention_tasks", ev.retention_tasks)):
            if wanted and self.engine.shards_parameters:
                raise engines.EngineError(
                    f"eval.{key}: it runs on one process's full model, and "
                    f"{self.engine.describe()} shards it; evaluate the saved model with "
                    "`unitune eval RUN_DIR` instead"
                )
        self.device = self.acc.device
        self.main = self.acc.is_main_process  # logs and files come from the main process only
        if not self.main:
            self.console.quiet = True
        # passes over fixed sets (references, held-out metrics) are split across the processes
        self.shard = Shard(self.acc.process_index, self.acc.num_processes, self.all_sum)
        self.model, self.tokenizer = load_model(cfg.model)
        if cfg.train.packing:  # the padded path was probed by load_model; packing apart
            check_logprobs(self.model, self.tokenizer, name=cfg.model.name, packed=True)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id: int = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.data = load_data(cfg, self.tokenizer)
        report_data(self.data, self.console, cfg.data.max_length)
        found = {slot: REGISTRY[getattr(cfg.objectives, slot).name] for slot in ("sft", "pref")}
        for slot, obj in found.items():
            if obj.slot != slot:
                raise ValueError(f"objectives.{slot}: {obj.name!r} is a {obj.slot} objective")
        # slot -> (objective, its parameters, its data split), for the slots with data
        self.objectives = {
            slot: (obj, getattr(cfg.objectives, slot).params(), self.data[slot])
            for slot, obj in found.items()
            if slot in self.data
        }
        # auxiliary inputs (KTO's mismatched pairs): over fixed partitions of the batches, so
        # that each batch's extra sequences are known and their reference log-probs cached
        self.partitions: dict[str, list[list[int]]] = {}
        self.aux: dict[tuple[str, str, str], Any] = {}
        for slot, (obj, _, split) in self.objectives.items():
            if not obj.inputs:
                continue
            lengths = [item_length(it) for it in split.train]
            self.partitions[slot] = length_batches(
                lengths, cfg.train.batch_size, seed=cfg.train.seed, shuffle=True
            )
            for name in obj.inputs:
                build = AUX_INPUTS[name].build
                self.aux[(slot, "train", name)] = build(split.train, self.partitions[slot])
                self.aux[(slot, "eval", name)] = build(split.eval, self.eval_batches(split.eval))
        # the model's log-prob wrapper, before Accelerate prepares it (`loop.prepare`)
        self.logps = PolicyLogps(
            self.model.to(self.device), cfg.train.logprob_chunk_size, packed=cfg.train.packing,
            compile=cfg.train.compile, max_length=cfg.data.max_length,
        ).to(self.device)  # fmt: skip

    def eval_batches(self, items: list) -> list[list[int]]:
        """The fixed batches of a held-out split (eval batch size, by length, unshuffled)."""
        lengths = [item_length(it) for it in items]
        return length_batches(lengths, self.cfg.train.eval_batch_size, seed=0, shuffle=False)

    def fingerprint(self, module: nn.Module, *, adapters: bool) -> str:
        """The model's weight fingerprint (`models.model_fingerprint`), the same on every process.
        Under FSDP / ZeRO-3 once `module` is prepared, each process holds a shard: the whole
        state dict is gathered on process 0 (as for saving), hashed there and the hash
        broadcast."""
        prepared = self.acc.unwrap_model(module) is not module
        if not (self.engine.shards_parameters and prepared):
            return model_fingerprint(self.model, adapters=adapters)
        full = self.acc.get_state_dict(module)  # every process takes part
        fp = [weights_fingerprint(full.items()) if self.main else None]
        broadcast_object_list(fp)
        return fp[0]

    def global_mean(self, values: dict[str, float]) -> dict[str, float]:
        """`values` averaged over the processes (the same keys on every rank): what every rank
        logs and decides on, so all ranks step on the same objective."""
        if self.acc.num_processes == 1 or not values:
            return values
        keys = list(values)  # the same order on every rank: the same plan
        t = self.all_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, (t / self.acc.num_processes).tolist(), strict=True))

    def global_max(self, values: dict[str, float]) -> dict[str, float]:
        """The largest of each value over the processes (the same keys on every rank)."""
        if self.acc.num_processes == 1 or not values:
            return values
        keys = list(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64).to(self.device)
        t = self.acc.gather(t[None]).amax(dim=0).cpu()
        return dict(zip(keys, t.tolist(), strict=True))

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (on CPU, as given)."""
        if self.acc.num_processes == 1:
            return t
        return self.acc.reduce(t.to(self.device), reduction="sum").to(t.device)
