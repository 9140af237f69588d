"""Held-out evaluation of the policy: the metrics (`eval/heldout.py`), each objective's own
held-out loss, the win rate of its generations (`eval.generate`), retention at the end.

Every held-out sequence is scored once per evaluation; the metrics and the own losses read its
rows. At the start of a fresh run the policy is the reference model, and its rows are the
initial reference log-probs: no forward runs.
"""

from __future__ import annotations

import torch
from torch import nn

from unitune.data import Items, Sequence
from unitune.eval import heldout as metrics
from unitune.eval.heldout import Ideal
from unitune.eval.retention import run_retention
from unitune.objectives import PairLogps, SeqLogps
from unitune.objectives.types import desirable
from unitune.training.batches import AUX_INPUTS, flatten
from unitune.training.generation import Generation
from unitune.training.policy import Policy, Scored
from unitune.training.references import compute_logps
from unitune.training.session import Session


class Evaluator:
    """Held-out figures of `policy` against the run's starting reference, with the ideal point
    `ideal` for the ideal distance and, when `eval.generate` is on, `generation`'s win rate."""

    def __init__(self, policy: Policy, ideal: Ideal, generation: Generation | None = None):
        self.policy, self.session, self.refs = policy, policy.session, policy.refs
        self.ideal, self.generation = ideal, generation
        self.beta = self.session.cfg.eval.beta  # f_pref and the reward margin, whatever the loss

    def evaluate(self, *, at_start: bool = False, step: int | None = None) -> dict[str, float]:
        """Held-out metrics and each objective's own held-out loss, from one forward per
        held-out sequence: the own losses reuse the metrics' log-probs (only an objective with its
        own model pass, IFT, runs it again). In inference mode (no autograd bookkeeping at all),
        except under engines that gather sharded parameters in their forward hooks (ZeRO-3,
        FSDP), which get `no_grad`.

        `at_start`: the policy is still the model the initial references were computed from
        (step 0 of a fresh run), so its held-out log-probs are those references, computed by the
        same pass (same batches, precision and order): they are reused and no forward runs.

        `eval.generate`: also the win rate of greedy responses to held-out prompts (`step` names
        its generations file)."""
        s, module = self.session, self.policy.module
        module.eval()
        out: dict[str, float] = {}
        quiet = torch.no_grad if s.engine.shards_parameters else torch.inference_mode
        try:
            # the training precision, as for the reference log-probs
            with quiet(), s.acc.autocast():
                scored = {
                    slot: self._score(slot, at_start)
                    for slot, split in s.data.items()
                    if split.kind != "prompts"  # online: answered and rewarded below
                }
                if "sft" in scored:
                    logp, n = scored["sft"]["main"]
                    out |= metrics.sft_metrics(
                        SeqLogps(logp, n, self.refs[("sft", "eval", "main")])
                    )
                if "pref" in scored and s.data["pref"].kind == "pairs":
                    (logp, n), ref = scored["pref"]["main"], self.refs[("pref", "eval", "main")]
                    m = len(s.data["pref"].eval)
                    pair = PairLogps(
                        SeqLogps(logp[:m], n[:m], ref[:m]), SeqLogps(logp[m:], n[m:], ref[m:])
                    )
                    out |= metrics.pref_metrics(pair, self.beta)
                if "pref" in scored and s.data["pref"].kind == "unpaired":
                    out |= self._feedback_metrics(scored["pref"])
                for slot in scored:
                    if not s.cfg.own_loss_is_metric(slot):  # else it is f_sft / f_pref
                        out[s.cfg.own_loss_key(slot)] = self._own_loss(slot, scored[slot])
            if self.policy.online is not None:
                out |= self.policy.online.evaluate()
        finally:
            module.train()
        if "f_sft" in out and "f_pref" in out:
            out["ideal_distance"] = metrics.ideal_distance(
                out["f_sft"], out["f_pref"], self.ideal.f_sft, self.ideal.f_pref
            )
        if self.generation is not None:
            model = s.acc.unwrap_model(module).model
            out |= self.generation.win_rate(model, step, at_start)
        return out

    def _score(self, slot: str, at_start: bool = False) -> Scored:
        """Policy log-probs of every held-out sequence of `slot` (and of its objective's auxiliary
        inputs), split across the processes; `at_start`: the initial references (`evaluate`)."""
        s = self.session
        inputs = {"main": flatten(s.data[slot].eval)}
        for name in s.objectives[slot][0].inputs:
            inputs[name] = s.aux[(slot, "eval", name)].seqs
        if at_start:
            return {
                name: (self.refs[(slot, "eval", name)].clone(), _target_counts(seqs))
                for name, seqs in inputs.items()
            }
        return {name: self._all_logps(seqs) for name, seqs in inputs.items()}

    def _own_loss(self, slot: str, scored: Scored) -> float:
        """The objective's own loss on held-out data: batch losses weighted by batch size, from
        the rows of `scored`. An objective with its own model pass (IFT) runs it, each process
        its share of the batches (`session.shard`)."""
        s = self.session
        obj, params, split = s.objectives[slot]
        batches = s.eval_batches(split.eval)
        if obj.forward is None:  # no forward: every process computes the same sum
            total = sum(
                float(obj.loss(self.policy.objective_input(slot, "eval", idx, scored), params))
                * len(idx)
                for idx in batches
            )
            return total / len(split.eval)
        sums = torch.zeros(len(batches), dtype=torch.float64)
        for j in s.shard.share(len(batches)):
            if s.poll is not None:
                s.poll()
            idx = batches[j if j is not None else 0]
            loss = float(obj.loss(self.policy.objective_input(slot, "eval", idx), params))
            if j is not None:
                sums[j] = loss * len(idx)
        return float(s.shard.all_sum(sums).sum()) / len(split.eval)

    def _feedback_metrics(self, scored: Scored) -> dict[str, float]:
        """Unpaired feedback: the logistic `f_pref`, reward accuracy and margin at `eval.beta`
        (`metrics.feedback_metrics`), and each auxiliary input's figure (KTO's KL estimate)."""
        s = self.session
        obj = s.objectives["pref"][0]
        items = s.data["pref"].eval
        logp, n = scored["main"]
        good = desirable(torch.tensor([f.target for f in items]))
        out = metrics.feedback_metrics(
            SeqLogps(logp, n, self.refs[("pref", "eval", "main")]), good, self.beta
        )
        for name in obj.inputs:  # each auxiliary input's figure over the held-out set
            out[name] = AUX_INPUTS[name].figure(scored[name][0] - self.refs[("pref", "eval", name)])
        return out

    def _all_logps(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.session
        logp = compute_logps(
            self.policy.module, seqs, pad_id=s.pad_id, batch_size=s.cfg.train.eval_batch_size,
            device=s.device, poll=s.poll, shard=s.shard,
        )  # fmt: skip
        return logp, _target_counts(seqs)


def retention(session: Session, module: nn.Module) -> dict[str, dict[str, float]]:
    """`eval.retention_tasks` on the model `module` wraps (lm-evaluation-harness,
    `retention.py`): `{task: {metric: value}}`, in the training precision; `{}` without tasks."""
    ev = session.cfg.eval
    if not ev.retention_tasks:
        return {}
    session.console.log(f"retention: {', '.join(ev.retention_tasks)} (lm-evaluation-harness)")
    with session.acc.autocast():
        return run_retention(
            session.acc.unwrap_model(module).model,
            session.tokenizer,
            ev.retention_tasks,
            ev.retention_limit,
            batch_size=session.cfg.train.eval_batch_size,
        )


def _target_counts(seqs: list[Sequence]) -> torch.Tensor:
    if isinstance(seqs, Items):
        return torch.from_numpy(seqs.n_targets())
    return torch.tensor([sum(s.target_mask) for s in seqs])
