"""The model being trained: its forward, each objective's inputs, the loss and its figures.

`PolicyLogps` wraps the causal LM so that its forward returns per-sequence response log-probs
(Accelerate prepares the wrapper). `Policy` turns a batch of a slot's items into what the slot's
objective consumes (`SeqLogps`, `PairLogps`, `FeedbackLogps`, or its own forward's output) and
returns the loss with the figures of that batch (`Loss`): nothing is kept between calls. A
`Penalty` is a term added to one slot's loss that the job composing the run passes in (PAFT's L1,
`merge/paft.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from unitune.core.phases import PHASES
from unitune.data import collate
from unitune.models.logprobs import sequence_logps
from unitune.objectives import FeedbackLogps, PairLogps, SeqLogps
from unitune.training.batches import AUX_INPUTS, collate_items, flatten

if TYPE_CHECKING:
    from unitune.training.online import Online
    from unitune.training.reference_set import References
    from unitune.training.references import RefKey
    from unitune.training.session import Session

# a held-out split's sequences scored once per evaluation: "main" (its items, flattened as a batch
# is) and each auxiliary input's sequences, as (summed log-probs, response-token counts)
Scored = dict[str, tuple[torch.Tensor, torch.Tensor]]


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that its forward returns per-sequence response log-probs.

    Accelerate prepares this wrapper (DDP/FSDP hooks then see every forward), and the LM head is
    applied only at response positions, in chunks (see `logprobs.py`). `packed` (`train.packing`):
    each batch's rows go through the decoder as one padding-free row; an objective's own forward
    (IFT) is not packed and runs on the padded batch.
    """

    def __init__(
        self, model: nn.Module, chunk_size: int, packed: bool = False, compile: bool = False,
        max_length: int = 512,
    ):  # fmt: skip
        super().__init__()
        self.model, self.chunk_size, self.packed = model, chunk_size, packed
        # `train.compile`: the decoder compiled, for passes with gradients (training steps).
        # Held in __dict__, not as a submodule: its parameters are the decoder's, counted once,
        # and the model itself is not changed (its copies, generation and saving see no compile).
        self.__dict__["compiled"] = None
        if compile:
            self.__dict__["compiled"] = _deterministic(
                torch.compile(model.get_decoder(), dynamic=True)
            )
            self._warm_up(max_length)

    @torch.no_grad()
    def _warm_up(self, length: int) -> None:
        """Compile the decoder's forward and backward on one fixed batch (2 rows of the run's
        `max_length` tokens, the longest it will see: what the compiled graph's guards on
        sizes are drawn from) before anything else runs through it: inductor sizes its kernels
        by the first batch it sees, so every process, fresh or resumed, compiles the same
        kernels (with `_deterministic`'s ordered sums, a resumed run ends bit for bit on the
        uninterrupted one: tests/test_compile.py). The gradients it computes are not kept; the
        random state is left as it was."""
        decoder = self.model.get_decoder()
        device = next(decoder.parameters()).device
        params = [p for p in decoder.parameters() if p.requires_grad]
        was_training = decoder.training
        decoder.train()  # as a training step sees it (the compiled graph guards on the mode)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            ids = torch.arange(2 * length, device=device).reshape(2, length) % 7 + 3
            hidden = self.compiled(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   use_cache=False).last_hidden_state  # fmt: skip
            if params and hidden.requires_grad:
                torch.autograd.grad(hidden.float().square().mean(), params[:1], allow_unused=True)
        decoder.train(was_training)

    def forward(self, input_ids, attention_mask, target_mask, objective_forward=None, **params):
        """Summed log-probs per row; or, for an objective with its own model pass (IFT), that
        pass's output (`objective_forward(model, ..., chunk_size=, **params)`)."""
        if objective_forward is not None:
            return objective_forward(
                self.model, input_ids, attention_mask, target_mask,
                chunk_size=self.chunk_size, **params,
            )  # fmt: skip
        compiled = self.compiled if torch.is_grad_enabled() else None
        return sequence_logps(
            self.model, input_ids, attention_mask, target_mask,
            chunk_size=self.chunk_size, packed=self.packed, decoder=compiled,
        )  # fmt: skip


def _deterministic(fn: Callable) -> Callable:
    """`fn` run (and so compiled) with torch's deterministic algorithms on, warnings only:
    inductor then lowers the scatter-adds of the backward pass (the embedding's gradient) to
    aten's ordered kernel instead of atomic adds, whose order changes the sum's rounding from run
    to run. The setting is given back after each call."""

    def run(*args, **kwargs):
        was = torch.are_deterministic_algorithms_enabled()
        warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn)

    return run


@dataclasses.dataclass(frozen=True)
class Penalty:
    """`weight * term()` added to the loss of `slot`, the term's value logged as `name`.
    `build(model)` makes the term once the model is on its device and in its dtype."""

    slot: str
    weight: float
    name: str
    build: Callable[[nn.Module], Callable[[], torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A slot's training loss on one batch, the tokens it processed, and the batch's figures
    (each auxiliary input's figure, a penalty's value) for the log."""

    value: torch.Tensor
    tokens: int
    figures: dict[str, float]
    # what a schedule watches of this slot when it is not the loss (an online slot: minus the
    # batch's mean reward; docs/methods.md, "Online training")
    observed: float | None = None

    @property
    def watched(self) -> float:
        return self.observed if self.observed is not None else float(self.value.detach())


class Policy:
    """The model being trained (`module`, as Accelerate prepared it) and its objectives' inputs
    and losses, against the run's reference log-probs `refs`."""

    def __init__(
        self,
        session: Session,
        module: nn.Module,
        refs: References,
        penalty: Penalty | None = None,
        online: Online | None = None,
    ):
        self.session, self.module, self.refs = session, module, refs
        self.online = online  # the online preference slot (training/online.py), if any
        self.penalty = penalty
        self.penalty_term = penalty.build(session.model) if penalty is not None else None

    def objective_input(self, slot: str, stage: str, idx: list[int], scored: Scored | None = None):
        """The log-probs the objective of `slot` consumes, on items `idx` of `stage` (train/eval):
        `SeqLogps`, `PairLogps`, `FeedbackLogps`, or its own forward's output (IFT). `scored`:
        the split's sequences already scored (the held-out pass): their rows, no forward."""
        s = self.session
        obj, params, split = s.objectives[slot]
        items = split.train if stage == "train" else split.eval
        if obj.forward is not None:
            with PHASES.phase("collate"):
                batch = collate_items(items, idx, s.pad_id, s.device)
            return self.module(**batch, objective_forward=obj.forward, **params.model_dump())
        if scored is None:  # pairs: one forward over chosen and rejected together
            with PHASES.phase("collate"):
                batch = collate_items(items, idx, s.pad_id, s.device)
            logp, n = self.module(**batch)
        else:  # flattened as a batch is: the chosen of every pair, then the rejected
            rows = idx + [i + len(items) for i in idx] if split.kind == "pairs" else idx
            logp, n = (t[rows].to(s.device) for t in scored["main"])
        ref = self.refs.get(slot, stage)

        def seq(rows: slice, ref_idx: list[int]) -> SeqLogps:
            r = ref[ref_idx].to(logp.device) if ref is not None else None
            return SeqLogps(logp[rows], n[rows], r)

        b = len(idx)
        if split.kind == "pairs":
            m = len(items)
            lp = PairLogps(seq(slice(0, b), idx), seq(slice(b, 2 * b), [i + m for i in idx]))
        elif split.kind == "demonstrations":
            lp = seq(slice(0, b), idx)
        else:
            target = torch.tensor([items[i].target for i in idx], device=logp.device)
            lp = FeedbackLogps(seq(slice(0, b), idx), target)
        aux = {name: self.aux_logps((slot, stage, name), idx, scored) for name in obj.inputs}
        return dataclasses.replace(lp, **aux) if aux else lp

    @torch.no_grad()
    def aux_logps(self, key: RefKey, idx: list[int], scored: Scored | None = None) -> SeqLogps:
        """An auxiliary input's sequences of batch `idx` (`batches.AUX_INPUTS`): policy log-probs
        (no grad, as TRL's KL pairs; or their rows of `scored`) and cached reference log-probs."""
        s = self.session
        aux = s.aux[key]
        rows = aux.rows(idx)
        if scored is None:
            batch = {k: v.to(s.device) for k, v in collate(aux.seqs[rows], s.pad_id).items()}
            logp, n = self.module(**batch)
        else:
            logp, n = (t[rows].to(s.device) for t in scored[key[2]])
        return SeqLogps(logp, n, self.refs[key][rows].to(logp.device))

    def loss(self, slot: str, idx) -> Loss:
        """The training objective of `slot` on the batch `idx` (an online slot: a `Pending`
        micro-batch of rollouts), with the batch's figures."""
        if self.online is not None and slot == "pref":
            return self.online.loss(idx)
        obj, params, split = self.session.objectives[slot]
        lp = self.objective_input(slot, "train", idx)
        n_tok = sum(len(s.input_ids) for s in flatten([split.train[i] for i in idx]))
        # each auxiliary input's figure of this batch (KTO: the KL estimate z)
        figures = {name: AUX_INPUTS[name].figure(getattr(lp, name).ratio) for name in obj.inputs}
        value = obj.loss(lp, params)
        if self.penalty_term is not None and slot == self.penalty.slot:
            term = self.penalty_term()
            figures[self.penalty.name] = term.item()
            value = value + self.penalty.weight * term
        return Loss(value, n_tok, figures)

    @torch.no_grad()
    def probe(self, batches: dict[str, list[int]]) -> dict[str, float]:
        """No-grad losses of both objectives on the current batches (MAXRIGHT's refresh); an
        online slot gives what a schedule watches of it (`Loss.observed`)."""
        self.module.eval()
        try:
            return self.session.global_mean(
                {k: self.loss(k, idx).watched for k, idx in batches.items()}
            )
        finally:
            self.module.train()
