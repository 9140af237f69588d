"""One run's model, data and reference log-probs, and what the objectives consume from them.

`Run.setup()` loads the model (Accelerate's device and precision), validates and tokenizes the
data, and computes (or loads from the cache) the reference log-probs into a typed `RefStore`.
`Run.loss(slot, batch)` is a training objective on one batch, `Run.evaluate()` the held-out
metrics (`metrics.py`). The loop that drives it is `trainer.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from torch import nn

from unitune.config import Config
from unitune.data import Items, Sequence, collate, length_batches
from unitune.eval import heldout as metrics
from unitune.eval.evaluate import generation_eval, judge_for, run_prompts
from unitune.eval.generate import EvalPrompt, generate
from unitune.eval.heldout import Ideal
from unitune.eval.retention import run_retention
from unitune.judges.registry import Judge
from unitune.merge.l1 import DeltaL1
from unitune.models.load import (
    cache_root,
    enable_gradient_checkpointing,
    load_model,
    model_fingerprint,
    reference_mode,
    weights_fingerprint,
)
from unitune.models.logprobs import sequence_logps
from unitune.objectives import REGISTRY, FeedbackLogps, PairLogps, SeqLogps
from unitune.objectives.types import desirable
from unitune.train import engines
from unitune.train.batches import AUX_INPUTS, collate_items, flatten, item_length, load_data
from unitune.train.references import RefKey, RefStore, Shard, compute_logps, reference_logps
from unitune.train.rundir import report_data

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

    def __init__(self, model: nn.Module, chunk_size: int, packed: bool = False):
        super().__init__()
        self.model, self.chunk_size, self.packed = model, chunk_size, packed

    def forward(self, input_ids, attention_mask, target_mask, objective_forward=None, **params):
        """Summed log-probs per row; or, for an objective with its own model pass (IFT), that
        pass's output (`objective_forward(model, ..., chunk_size=, **params)`)."""
        if objective_forward is not None:
            return objective_forward(
                self.model, input_ids, attention_mask, target_mask,
                chunk_size=self.chunk_size, **params,
            )  # fmt: skip
        return sequence_logps(
            self.model, input_ids, attention_mask, target_mask,
            chunk_size=self.chunk_size, packed=self.packed,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Generation:
    """`eval.generate`'s fixed inputs: the held-out prompts with their references, the judge,
    and (`eval.win_rate_against: base`) the starting model's responses."""

    prompts: list[EvalPrompt]
    judge: Judge
    base: list[str] | None = None


class Run:
    """A run's model, data, references and objectives; `trainer.train()` drives it."""

    def __init__(self, cfg: Config, console: Console | None = None, progress: bool = True):
        self.cfg, self.console, self.show_progress = cfg, console or Console(), progress
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
        self.out = Path(cfg.output_dir)
        self.ideal = Ideal()  # for the ideal distance; the trainer sets the run's
        self.poll = None  # called between batches of long passes; raises to stop (SIGTERM)

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.train.seed)
        # Accelerate keeps one process-wide state and refuses a second Accelerator with another
        # precision; a later run in the same process (a sweep, the demo, a notebook) may differ.
        # The distributed part (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = engines.accelerator(cfg)
        self.engine = engines.Engine.of(self.acc)
        engines.check(cfg, self.engine)
        engines.fill_deepspeed(cfg, self.acc)
        self.device = self.acc.device
        self.main = self.acc.is_main_process  # logs and files come from the main process only
        if not self.main:
            self.console.quiet = True
        # passes over fixed sets (references, held-out metrics) are split across the processes
        self.shard = Shard(self.acc.process_index, self.acc.num_processes, self._all_sum)
        self.model, self.tokenizer = load_model(cfg.model)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.data = load_data(cfg, self.tokenizer)
        report_data(self.data, self.console, cfg.data.max_length)
        self.sft_obj = REGISTRY[cfg.objectives.sft.name]
        self.pref_obj = REGISTRY[cfg.objectives.pref.name]
        for kind, obj in (("sft", self.sft_obj), ("pref", self.pref_obj)):
            if obj.kind != kind:
                raise ValueError(f"objectives.{kind}: {obj.name!r} is a {obj.kind} objective")
        self.objectives = {
            slot: (obj, getattr(cfg.objectives, slot).params(), self.data[slot])
            for slot, obj in (("sft", self.sft_obj), ("pref", self.pref_obj))
            if slot in self.data
        }
        self.beta = cfg.eval.beta  # f_pref and the reward margin, whatever the objective
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
                self.aux[(slot, "eval", name)] = build(split.eval, self._eval_batches(split.eval))
        self.policy = PolicyLogps(
            self.model, cfg.train.logprob_chunk_size, packed=cfg.train.packing
        ).to(self.device)
        # PAFT's L1 penalty on the SFT objective's delta from the starting weights, copied once
        # the model is on its device
        self.l1 = DeltaL1(self.model) if cfg.schedule.l1 > 0 else None
        self.refs = RefStore()
        self.extras: dict[str, dict[str, float]] = {}  # per-slot figures of the last step
        self.generation = self._generation_setup()
        self.compute_references(initial=True)

    def _generation_setup(self) -> Generation | None:
        """`eval.generate`: the held-out prompts with their references, and the judge, set up
        before training (a bad prompt or judge spec stops the run now, not at its first eval)."""
        ev = self.cfg.eval
        for key, wanted in (("generate", ev.generate), ("retention_tasks", ev.retention_tasks)):
            if wanted and self.engine.shards_parameters:
                raise engines.EngineError(
                    f"eval.{key}: it runs on one process's full model, and "
                    f"{self.engine.describe()} shards it; evaluate the saved model with "
                    "`unitune eval RUN_DIR` instead"
                )
        if not ev.generate:
            return None
        prompts, judge = run_prompts(self.cfg, max_samples=ev.generate_samples), judge_for(ev)
        base = self._base_responses(prompts) if ev.win_rate_against == "base" else None
        return Generation(prompts, judge, base)

    def _base_responses(self, prompts: list[EvalPrompt]) -> list[str]:
        """The starting model's greedy responses to `prompts` (`eval.win_rate_against: base`),
        cached under the cache dir by the starting weights, the precision, the prompts and the
        generation settings: the runs of a sweep or of the demo generate them once."""
        ev, bs = self.cfg.eval, self.cfg.train.eval_batch_size
        texts = [p.prompt for p in prompts]
        key = hashlib.sha256(
            json.dumps(
                [self.fingerprint(adapters=False), self.acc.mixed_precision, texts,
                 ev.max_new_tokens, bs],
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]  # fmt: skip
        path = self.cache_dir / "generations" / f"{key}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if isinstance(cached, list) and len(cached) == len(texts):
                self.console.log("eval.generate: the starting model's responses: cache hit")
                return cached
        self.console.log(f"eval.generate: the starting model's responses ({len(texts)})")
        with reference_mode(self.model), self.acc.autocast():
            base = generate(
                self.model, self.tokenizer, texts, max_new_tokens=ev.max_new_tokens,
                batch_size=bs,
            )  # fmt: skip
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(base))
            os.replace(tmp, path)
        return base

    def retention(self) -> dict[str, dict[str, float]]:
        """`eval.retention_tasks` on the current model (lm-evaluation-harness, `retention.py`):
        `{task: {metric: value}}`, in the training precision; `{}` without tasks."""
        ev = self.cfg.eval
        if not ev.retention_tasks:
            return {}
        self.console.log(f"retention: {', '.join(ev.retention_tasks)} (lm-evaluation-harness)")
        with self.acc.autocast():
            return run_retention(
                self.acc.unwrap_model(self.policy).model,
                self.tokenizer,
                ev.retention_tasks,
                ev.retention_limit,
                batch_size=self.cfg.train.eval_batch_size,
            )

    def compute_references(self, *, initial: bool, model_fp: str | None = None) -> str | None:
        """Reference log-probs into `self.refs`: for the training sets whose objective needs them;
        on the initial call also for the eval sets (the metrics' fixed starting reference).
        Returns the reference's fingerprint.

        Initially the reference is the starting model (LoRA: adapters disabled). Later calls
        (sequential's preference stage) take the current model, adapters included. Given a
        `model_fp` (a resumed run's switched reference), entries are only looked up in the cache:
        None is returned when one is missing, and nothing is computed.
        """
        # the precision is part of the key: bf16 log-probs differ from fp32 ones
        fp = model_fp or f"{self.fingerprint(adapters=not initial)}|{self.acc.mixed_precision}"
        wanted = []
        if "sft" in self.data and self.sft_obj.needs_ref:
            wanted.append((("sft", "train", "main"), self.data["sft"].train))
        if "pref" in self.data and self.pref_obj.needs_ref:
            wanted.append((("pref", "train", "main"), self.data["pref"].train))
        splits = ("train", "eval") if initial else ("train",)
        wanted += [(key, aux.seqs) for key, aux in self.aux.items() if key[1] in splits]
        if initial:
            wanted += [((k, "eval", "main"), s.eval) for k, s in self.data.items()]
        ref_ctx = reference_mode(self.model) if initial else nullcontext()
        # each process computes its share of the batches (`self.shard`), process 0 writes
        with ref_ctx, self.acc.autocast():
            for key, items in wanted:
                logps, hit, entry = reference_logps(
                    self.policy,
                    flatten(items),
                    model_fp=fp,
                    cache_dir=self.cache_dir,
                    pad_id=self.pad_id,
                    batch_size=self.cfg.train.eval_batch_size,
                    device=self.device,
                    only_cached=model_fp is not None,
                    poll=self.poll,
                    shard=self.shard,
                )
                if logps is None:
                    return None
                self.refs.put(key, logps, entry)
                self.console.log(
                    f"reference log-probs {'/'.join(key)}: {'cache hit' if hit else 'computed'}"
                    f" ({len(items)} items)"
                )
        return fp

    def fingerprint(self, *, adapters: bool) -> str:
        """The model's weight fingerprint (`models.model_fingerprint`), the same on every process.
        Under FSDP / ZeRO-3 once training started, each process holds a shard: the whole state
        dict is gathered on process 0 (as for saving), hashed there and the hash broadcast."""
        prepared = self.acc.unwrap_model(self.policy) is not self.policy
        if not (self.engine.shards_parameters and prepared):
            return model_fingerprint(self.model, adapters=adapters)
        full = self.acc.get_state_dict(self.policy)  # every process takes part
        fp = [weights_fingerprint(full.items()) if self.main else None]
        broadcast_object_list(fp)
        return fp[0]

    # ------------------------------------------------------------ objectives
    def objective_input(self, slot: str, stage: str, idx: list[int], scored: Scored | None = None):
        """The log-probs the objective of `slot` consumes, on items `idx` of `stage` (train/eval):
        `SeqLogps`, `PairLogps`, `FeedbackLogps`, or its own forward's output (IFT). `scored`:
        the split's sequences already scored (the held-out pass): their rows, no forward."""
        obj, params, split = self.objectives[slot]
        items = split.train if stage == "train" else split.eval
        if obj.forward is not None:
            batch = collate_items(items, idx, self.pad_id, self.device)
            return self.policy(**batch, objective_forward=obj.forward, **params.model_dump())
        if scored is None:  # pairs: one forward over chosen and rejected together
            logp, n = self.policy(**collate_items(items, idx, self.pad_id, self.device))
        else:  # flattened as a batch is: the chosen of every pair, then the rejected
            rows = idx + [i + len(items) for i in idx] if split.kind == "pairs" else idx
            logp, n = (t[rows].to(self.device) for t in scored["main"])
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
        aux = self.aux[key]
        rows = aux.rows(idx)
        if scored is None:
            batch = {k: v.to(self.device) for k, v in collate(aux.seqs[rows], self.pad_id).items()}
            logp, n = self.policy(**batch)
        else:
            logp, n = (t[rows].to(self.device) for t in scored[key[2]])
        return SeqLogps(logp, n, self.refs[key][rows].to(logp.device))

    def loss(self, slot: str, idx: list[int]) -> tuple[torch.Tensor, int]:
        """The training objective of `slot` on the batch `idx`; returns (loss, tokens processed)."""
        obj, params, split = self.objectives[slot]
        lp = self.objective_input(slot, "train", idx)
        n_tok = sum(len(s.input_ids) for s in flatten([split.train[i] for i in idx]))
        # each auxiliary input's figure of this batch (KTO: the KL estimate z)
        self.extras[slot] = {
            name: AUX_INPUTS[name].figure(getattr(lp, name).ratio) for name in obj.inputs
        }
        loss = obj.loss(lp, params)
        if slot == "sft" and self.l1 is not None:
            norm = self.l1()
            self.extras[slot]["l1_norm"] = norm.item()
            loss = loss + self.cfg.schedule.l1 * norm
        return loss, n_tok

    @torch.no_grad()
    def probe(self, batches: dict[str, list[int]]) -> dict[str, float]:
        """No-grad losses of both objectives on the current batches (MAXRIGHT's refresh)."""
        self.policy.eval()
        try:
            return self.global_mean({k: float(self.loss(k, idx)[0]) for k, idx in batches.items()})
        finally:
            self.policy.train()

    def global_mean(self, values: dict[str, float]) -> dict[str, float]:
        """`values` averaged over the processes (the same keys on every rank): what every rank
        logs and decides on, so all ranks step on the same objective."""
        if self.acc.num_processes == 1 or not values:
            return values
        keys = list(values)  # the same order on every rank: the same plan
        t = self._all_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, (t / self.acc.num_processes).tolist(), strict=True))

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (on CPU, as given)."""
        if self.acc.num_processes == 1:
            return t
        return self.acc.reduce(t.to(self.device), reduction="sum").to(t.device)

    # ------------------------------------------------------------------ eval
    def evaluate(self, *, at_start: bool = False, step: int | None = None) -> dict[str, float]:
        """Held-out metrics (`metrics.py`) and each objective's own held-out loss, from one
        forward per held-out sequence: the own losses reuse the metrics' log-probs (only an
        objective with its own model pass, IFT, runs it again). In inference mode (no autograd
        bookkeeping at all), except under engines that gather sharded parameters in their
        forward hooks (ZeRO-3, FSDP), which get `no_grad`.

        `at_start`: the policy is still the model the initial references were computed from
        (step 0 of a fresh run), so its held-out log-probs are those references, computed by the
        same pass (same batches, precision and order): they are reused and no forward runs.

        `eval.generate`: also the win rate of greedy responses to held-out prompts (`_generate`;
        `step` names its generations file)."""
        self.policy.eval()
        out: dict[str, float] = {}
        quiet = torch.no_grad if self.engine.shards_parameters else torch.inference_mode
        try:
            # the training precision, as for the reference log-probs
            with quiet(), self.acc.autocast():
                scored = {slot: self._score(slot, at_start) for slot in self.data}
                if "sft" in scored:
                    logp, n = scored["sft"]["main"]
                    out |= metrics.sft_metrics(
                        SeqLogps(logp, n, self.refs[("sft", "eval", "main")])
                    )
                if "pref" in scored and self.data["pref"].kind == "pairs":
                    (logp, n), ref = scored["pref"]["main"], self.refs[("pref", "eval", "main")]
                    m = len(self.data["pref"].eval)
                    pair = PairLogps(
                        SeqLogps(logp[:m], n[:m], ref[:m]), SeqLogps(logp[m:], n[m:], ref[m:])
                    )
                    out |= metrics.pref_metrics(pair, self.beta)
                if "pref" in scored and self.data["pref"].kind == "unpaired":
                    out |= self._feedback_metrics(scored["pref"])
                for slot in self.data:
                    if not self.cfg.own_loss_is_metric(slot):  # else it is f_sft / f_pref
                        out[self.cfg.own_loss_key(slot)] = self._own_loss(slot, scored[slot])
        finally:
            self.policy.train()
        if "f_sft" in out and "f_pref" in out:
            out["ideal_distance"] = metrics.ideal_distance(
                out["f_sft"], out["f_pref"], self.ideal.f_sft, self.ideal.f_pref
            )
        if self.generation is not None:
            out |= self._generate(step, at_start)
        return out

    def _generate(self, step: int | None, at_start: bool) -> dict[str, float]:
        """`eval.generate`: greedy responses to the held-out prompts, judged against their
        references or the starting model's responses (`eval.win_rate_against`) as `win_rate`,
        `win_rate_se`, in the training precision; the main process writes them to
        `generations/step-N.jsonl`. Every process generates the same (greedy, the same weights),
        so each logs the same figures. At the start, the starting model's responses are reused."""
        gen, ev = self.generation, self.cfg.eval
        prompts, judge = gen.prompts, gen.judge
        path = None
        if self.main and step is not None:
            path = self.out / "generations" / f"step-{step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
        with self.acc.autocast():
            return generation_eval(
                self.acc.unwrap_model(self.policy).model,
                self.tokenizer,
                [p.prompt for p in prompts],
                [p.reference for p in prompts],
                judge,
                max_new_tokens=ev.max_new_tokens,
                batch_size=self.cfg.train.eval_batch_size,
                out_path=path,
                opponents=gen.base,
                responses=gen.base if at_start else None,
            )

    def _score(self, slot: str, at_start: bool = False) -> Scored:
        """Policy log-probs of every held-out sequence of `slot` (and of its objective's auxiliary
        inputs), split across the processes; `at_start`: the initial references (`evaluate`)."""
        bs, split = self.cfg.train.eval_batch_size, self.data[slot]
        inputs = {"main": flatten(split.eval)}
        for name in self.objectives[slot][0].inputs:
            inputs[name] = self.aux[(slot, "eval", name)].seqs
        if at_start:
            return {
                name: (self.refs[(slot, "eval", name)].clone(), _target_counts(seqs))
                for name, seqs in inputs.items()
            }
        return {name: self._all_logps(seqs, bs) for name, seqs in inputs.items()}

    def _eval_batches(self, items: list) -> list[list[int]]:
        lengths = [item_length(it) for it in items]
        return length_batches(lengths, self.cfg.train.eval_batch_size, seed=0, shuffle=False)

    def _own_loss(self, slot: str, scored: Scored) -> float:
        """The objective's own loss on held-out data: batch losses weighted by batch size, from
        the rows of `scored`. An objective with its own model pass (IFT) runs it, each process
        its share of the batches (`self.shard`)."""
        obj, params, split = self.objectives[slot]
        batches = self._eval_batches(split.eval)
        if obj.forward is None:  # no forward: every process computes the same sum
            total = sum(
                float(obj.loss(self.objective_input(slot, "eval", idx, scored), params)) * len(idx)
                for idx in batches
            )
            return total / len(split.eval)
        sums = torch.zeros(len(batches), dtype=torch.float64)
        for j in self.shard.share(len(batches)):
            if self.poll is not None:
                self.poll()
            idx = batches[j if j is not None else 0]
            loss = float(obj.loss(self.objective_input(slot, "eval", idx), params))
            if j is not None:
                sums[j] = loss * len(idx)
        return float(self.shard.all_sum(sums).sum()) / len(split.eval)

    def _feedback_metrics(self, scored: Scored) -> dict[str, float]:
        """Unpaired feedback: the logistic `f_pref`, reward accuracy and margin at `eval.beta`
        (`metrics.feedback_metrics`), and each auxiliary input's figure (KTO's KL estimate)."""
        obj = self.objectives["pref"][0]
        items = self.data["pref"].eval
        logp, n = scored["main"]
        good = desirable(torch.tensor([f.target for f in items]))
        out = metrics.feedback_metrics(
            SeqLogps(logp, n, self.refs[("pref", "eval", "main")]), good, self.beta
        )
        for name in obj.inputs:  # each auxiliary input's figure over the held-out set
            out[name] = AUX_INPUTS[name].figure(scored[name][0] - self.refs[("pref", "eval", name)])
        return out

    def _all_logps(self, seqs: list[Sequence], bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = compute_logps(
            self.policy, seqs, pad_id=self.pad_id, batch_size=bs, device=self.device,
            poll=self.poll, shard=self.shard,
        )  # fmt: skip
        return logp, _target_counts(seqs)


def _target_counts(seqs: list[Sequence]) -> torch.Tensor:
    if isinstance(seqs, Items):
        return torch.from_numpy(seqs.n_targets())
    return torch.tensor([sum(s.target_mask) for s in seqs])
