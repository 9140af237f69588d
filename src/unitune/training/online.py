"""The online preference slot: generate, reward and learn in the training loop.

A *generation batch* is `steps_per_generation` (S) micro-batches of `train.batch_size`
completions on each process: `batch_size / G` prompts per micro-batch, `G` samples each, a
prompt's group always inside one micro-batch on one process. It is sampled by the current policy,
scored by the rewards (on the decoded text), shaped (`missing_eos_penalty`, clipping, the UNA map)
and served one micro-batch per accumulation step, `num_iterations` (mu) times over, before the
next one is generated: TRL's `steps_per_generation` / `num_iterations`. The buffer, the prompt
stream, the window position and the running reward statistics are `OnlineState`, saved whole in
every checkpoint (each process's buffer), so a resumed run continues bitwise.

Sampling is seeded per micro-batch by its global index (`BatchStream`'s: `drawn * world + rank`),
so one process with accumulation and several processes draw the same completions for the same
prompts. Rewards are gathered across the processes before anything is computed over the batch
(batch std, running statistics, the logged figures).

A micro-batch is drawn lazily: `stream.next()` returns a `Pending` handle, and a micro-batch is
only served (generating when its window is spent) when the loss or the schedule's probe asks for
it. A schedule that skips the preference slot at a step (ALRIGHT, sequential's SFT stage)
generates nothing for it.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from unitune.core.io import atomic_write
from unitune.core.phases import PHASES
from unitune.eval.generate import eos_ids
from unitune.models.generation_copy import GenerationCopy, generation_dtype
from unitune.models.logprobs import completion_logps
from unitune.models.lora import merged_weights, reference_mode
from unitune.models.source import model_dir
from unitune.models.vllm_generator import VllmGenerator
from unitune.objectives import RolloutLogps
from unitune.objectives.online import zero_std_groups
from unitune.rewards import Rewards, build_rewards
from unitune.rewards.shaping import RunningStats, clip, missing_eos, una_map
from unitune.training.batches import BatchStream
from unitune.training.rollout import Rollouts, derived_seed, full_parameters, sample

if TYPE_CHECKING:
    from unitune.training.policy import Loss
    from unitune.training.session import Session


@dataclass
class Buffer:
    """One generation batch on this process (see the module doc)."""

    prompts: list[int]  # prompt indices of split.train, in row order (each G times)
    rollouts: Rollouts
    rewards: Tensor  # [N] float32: what the objective trains on (shaped, mapped); NaN unscored
    combined: Tensor  # [N] float64: the weighted reward after penalty and clipping, not mapped
    old_logp: Tensor | None  # [N, T] pi_old (the sampler), when the objective reads it
    ref_logp: Tensor | None  # [N, T] the reference, when the objective reads it
    batch_std: float  # std of `rewards` over the generation batch of every process
    num_items: float  # completion tokens per micro-batch, mean over the batch and the processes
    figures: dict[str, float]  # the generation's logged figures (every process's rows)
    per_function: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        r = self.rollouts
        out = {
            "input_ids": r.input_ids, "attention_mask": r.attention_mask, "starts": r.starts,
            "mask": r.mask, "truncated": r.truncated, "sample_logp": r.sample_logp,
            "rewards": self.rewards, "combined": self.combined,
        }  # fmt: skip
        if self.old_logp is not None:
            out["old_logp"] = self.old_logp
        if self.ref_logp is not None:
            out["ref_logp"] = self.ref_logp
        for i, t in enumerate(self.per_function.values()):
            out[f"reward{i}"] = t
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts, "batch_std": self.batch_std, "num_items": self.num_items,
            "figures": self.figures, "functions": list(self.per_function),
        }  # fmt: skip

    @classmethod
    def restore(cls, meta: dict[str, Any], t: dict[str, Tensor]) -> Buffer:
        r = Rollouts(
            t["input_ids"], t["attention_mask"], t["starts"], t["mask"], t["truncated"],
            t["sample_logp"],
        )  # fmt: skip
        per = {name: t[f"reward{i}"] for i, name in enumerate(meta["functions"])}
        return cls(
            list(meta["prompts"]), r, t["rewards"], t["combined"], t.get("old_logp"),
            t.get("ref_logp"), float(meta["batch_std"]), float(meta["num_items"]),
            dict(meta["figures"]), per,
        )  # fmt: skip


@dataclass
class Pending:
    """A micro-batch of the online slot, served when first asked for (`Online.serve`)."""

    online: Online
    served: tuple[Buffer, slice, bool] | None = None  # (buffer, rows, first use of the rows)

    def get(self) -> tuple[Buffer, slice, bool]:
        if self.served is None:
            self.served = self.online.serve()
        return self.served

    @property
    def items(self) -> list[int]:
        """The prompt indices of the served rows (the batch log), [] when never served."""
        if self.served is None:
            return []
        buf, rows, _ = self.served
        return buf.prompts[rows][:: self.online.G]


class OnlineStream:
    """The online slot's stream of micro-batches for the loop: each `next()` a `Pending`."""

    def __init__(self, online: Online):
        self.online = online

    def __iter__(self) -> OnlineStream:
        return self

    def __next__(self) -> Pending:
        return Pending(self.online)

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


class Online:
    """The online preference slot of a run: its rewards, prompt stream, reference model and
    buffer (`OnlineState`: everything here that changes, saved in checkpoints)."""

    def __init__(self, session: Session):
        s, cfg = session, session.cfg
        self.session, self.cfg, on = s, cfg, cfg.online
        self.obj, self.params, self.split = s.objectives["pref"]
        self.G, self.S, self.mu = (
            cfg.num_generations(),
            cfg.steps_per_generation(),
            on.num_iterations,
        )
        self.per_micro = cfg.train.batch_size  # completions per micro-batch
        self.eos = eos_ids(s.model, s.tokenizer)
        with whole_models():  # reward models are not partitioned by ZeRO-3
            self.rewards: Rewards = build_rewards(
                [(r.reward, r.weight) for r in on.rewards],
                trust_remote_code=on.trust_remote_code, device=str(s.device),
                judge_url=on.judge_url, judge_key_env=on.judge_key_env, label="online.rewards",
                batch_size=on.reward_batch_size,
            )  # fmt: skip
        rank, world = s.acc.process_index, s.acc.num_processes
        # micro-batches of prompts, by length, each process every world-th (`BatchStream`)
        self.prompt_stream = BatchStream(
            self.split.train, self.per_micro // self.G, cfg.train.seed + 7, rank=rank, world=world
        )
        self.stats = RunningStats()
        self.map = self._score_map()
        self.buffer: Buffer | None = None
        self.position = 0  # micro-batches served from the buffer
        self.generations = 0
        self.timing: dict[str, float] = {}
        self.module: nn.Module | None = None
        self.uses_old = self.mu > 1 or getattr(self.params, "reference", None) == "rollout"
        self.uses_ref = self._needs_reference()
        # the reference model: LoRA at the start -> the adapters switched off; else a frozen copy
        self.reference: nn.Module | None = None
        if self.uses_ref and not self._adapters():
            self.reference = self._frozen_copy(s.model)
        self.copy: GenerationCopy | None = None  # what generates, where a copy is used
        self.vllm: VllmGenerator | None = None  # online.generator: vllm
        self.warned_gap = False

    # ------------------------------------------------------------------------ the generator
    def generator(self, model: nn.Module) -> nn.Module:
        """What generates rollouts and held-out answers: the policy itself, except on a CPU,
        under one process or DDP, when the generation dtype (`online.generation_dtype`; auto:
        bfloat16 under bf16 mixed precision) is not the policy's: then the generation copy
        (`models.generation_copy`: the policy's weights in that dtype, LoRA merged, packed for
        the CPU's kernels), refreshed from the policy here, before every generation, so it is
        never stale. With `online.generator: hf` the policy, through HF `generate`."""
        s, on = self.session, self.cfg.online
        if on.generator == "vllm":
            return self._vllm(model)
        if on.generator != "unitune" or s.device.type != "cpu":
            return model
        if s.engine.kind not in ("single", "ddp"):
            return model
        dtype = generation_dtype(model, on.generation_dtype, s.acc.mixed_precision)
        if dtype == next(model.parameters()).dtype:
            return model
        if self.copy is None:
            self.copy = GenerationCopy(model, dtype)
        else:
            self.copy.refresh(model)
        return self.copy.module

    def _vllm(self, model: nn.Module) -> VllmGenerator:
        """This process's vLLM engine (`models.vllm_generator`; started at the first
        generation, from the starting checkpoint), given the policy's current weights (LoRA
        merged, gathered where an engine shards them) before every generation batch and
        evaluation."""
        s, cfg, v = self.session, self.cfg, self.cfg.online.vllm
        if self.vllm is None:
            dtype = generation_dtype(model, cfg.online.generation_dtype, s.acc.mixed_precision)
            self.vllm = VllmGenerator(
                model_dir(cfg.model.name, cfg.model.revision, label="model.name"), dtype=dtype,
                seed=cfg.train.seed + s.acc.process_index, rank=s.acc.process_index,
                local_rank=s.acc.local_process_index, world_size=s.acc.num_processes,
                gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
                max_num_seqs=v.max_num_seqs, sleep=v.sleep,
                trust_remote_code=cfg.model.trust_remote_code,
            )  # fmt: skip
        with full_parameters(model, s.engine, wrapped=self.module):
            self.vllm.sync(merged_weights(model))
        return self.vllm

    def _gathered(self, model: nn.Module):
        """The policy's whole parameters for a generation on the policy (none for vLLM, which
        holds its own copy)."""
        if self.cfg.online.generator == "vllm":
            return nullcontext()
        return full_parameters(model, self.session.engine, wrapped=self.module)

    def _release(self) -> None:
        """The generation copy's packed weights (vLLM with sleep: its memory) freed until the
        next generation."""
        if self.copy is not None:
            self.copy.release()
        if self.vllm is not None:
            self.vllm.release()

    # ------------------------------------------------------------------------ set-up
    def _needs_reference(self) -> bool:
        """The reference model's log-probs are read when the objective has one (`needs_ref`),
        a `beta` > 0 where it has one, and, for una_online, `reference: init`."""
        if not self.obj.needs_ref:
            return False
        if getattr(self.params, "beta", 1.0) == 0:
            return False
        return getattr(self.params, "reference", "init") != "rollout"

    def _adapters(self) -> bool:
        return hasattr(self.session.model, "disable_adapter")

    def _score_map(self) -> str:
        """The map to [0, 1] (`online.score_map`; default sigmoid for an objective that fits
        scores in [0, 1], none for the others)."""
        how = self.cfg.online.score_map
        if how is None:
            how = "sigmoid" if getattr(self.obj, "unit_rewards", False) else "none"
        return how

    def _frozen_copy(self, model: nn.Module) -> nn.Module:
        if getattr(self.session.engine, "zero3_init", False):
            raise RuntimeError(
                "an online objective with a reference model needs the whole model on each "
                "process for its frozen copy; DeepSpeed zero3_init partitions it while loading: "
                "set zero3_init_flag: false"
            )
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def attach(self, module: nn.Module) -> None:
        """The policy's prepared module (after `acc.prepare`)."""
        self.module = module

    def switch_reference(self) -> None:
        """Sequential's reset: the current model becomes the reference (a frozen copy)."""
        if self.uses_ref:
            self.reference = self._frozen_copy(self.session.model)

    def restore_reference(self, ckpt) -> None:
        """A resumed run whose reference was switched (sequential): the model of the switch's
        checkpoint `ckpt` (pinned by the loop) as the frozen reference."""
        if not self.uses_ref:
            return
        from unitune.training import checkpoint

        ref = self._frozen_copy(self.session.model)
        checkpoint.load_checkpoint(ckpt, model=ref, optimizer=None, scheduler=None)
        self.reference = ref

    # ------------------------------------------------------------------------ held out
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The online slot's held-out figures: the greedy answers to the held-out prompts scored
        by the rewards (after the EOS penalty and clipping, before any map): `eval_reward`
        (their mean) and `f_pref = -eval_reward`; their length and truncated share, and KL to
        the reference (summed over each answer, at temperature 1) where there is a reference.
        Each process answers its share of the prompts (the same number of batches everywhere,
        as sharding engines gather weights collectively)."""
        s, on = self.session, self.cfg.online
        items = self.split.eval
        bs = self.cfg.train.eval_batch_size
        batches = [list(range(i, min(i + bs, len(items)))) for i in range(0, len(items), bs)]
        model = s.acc.unwrap_model(self.module).model
        gen = self.generator(model)
        combined, lengths, trunc, kls = [], [], [], []
        for j in s.shard.share(len(batches)):
            if s.poll is not None:
                s.poll()
            idx = batches[j if j is not None else 0]
            with self._gathered(model), s.acc.autocast():
                r = sample(
                    gen, [items[i].prompt_ids for i in idx], num_generations=1, eos=self.eos,
                    pad_id=s.pad_id, max_new_tokens=on.max_new_tokens, do_sample=False,
                    generator=on.generator,
                )  # fmt: skip
            kl = self._answer_kl(r) if self._has_reference() else None
            if j is None:
                continue
            scores = self.score(idx, r, items)
            combined.append(self.shape(scores.combined, r.truncated))
            lengths.append(r.lengths.double())
            trunc.append(r.truncated.double())
            if kl is not None:
                kls.append(kl)
        self._release()
        out: dict[str, float] = {}

        def every(parts: list[Tensor]) -> Tensor:
            mine = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
            return gather_rows(s, mine)

        rewards = every(combined)
        ok = rewards[~torch.isnan(rewards)]
        out["eval_reward"] = float(ok.mean()) if ok.numel() else math.nan
        out["f_pref"] = -out["eval_reward"]
        out["eval_completion_length"] = float(every(lengths).mean())
        out["eval_clipped_ratio"] = float(every(trunc).mean())
        if self._has_reference():
            out["eval_kl"] = float(every(kls).mean())
        return out

    def _has_reference(self) -> bool:
        return self.reference is not None or self._adapters()

    def _answer_kl(self, r: Rollouts) -> Tensor:
        """sum_t (log pi(y_t) - log pi_ref(y_t)) of each answer, at temperature 1."""
        s = self.session
        with torch.no_grad(), s.acc.autocast():
            pol = self.module(
                r.input_ids.to(s.device), r.attention_mask.to(s.device), None,
                objective_forward=rollout_forward, starts=r.starts, width=r.mask.shape[1],
                temperature=1.0,
            ).float().cpu() * r.mask  # fmt: skip
        ref = self.reference_logps(r, temperature=1.0)
        return ((pol - ref) * r.mask).sum(dim=1).double()

    # ------------------------------------------------------------------------ serving
    def serve(self) -> tuple[Buffer, slice, bool]:
        """The next micro-batch: (buffer, its rows, whether this is the rows' first use),
        generating a new batch when the window (S micro-batches, mu times) is spent."""
        if self.buffer is None or self.position >= self.S * self.mu:
            self.buffer, self.position = self.generate(), 0
        m = self.position % self.S
        n_micro = len(self.buffer.prompts) // self.S if self.S else 0
        first = self.position < self.S
        self.position += 1
        return self.buffer, slice(m * n_micro, (m + 1) * n_micro), first

    def generate(self) -> Buffer:
        """A generation batch: S micro-batches of prompts, sampled, scored, shaped, with the
        log-probs of pi_old and of the reference where the objective reads them."""
        s, on = self.session, self.cfg.online
        model = s.acc.unwrap_model(self.module).model
        t0 = time.time()
        PHASES.enter("generate")
        gen = self.generator(model)
        chunks, prompts = [], []
        for _ in range(self.S):
            key = self.prompt_stream.drawn * self.prompt_stream.world + self.prompt_stream.rank
            idx = next(self.prompt_stream)
            with self._gathered(model), s.acc.autocast():
                chunks.append(
                    sample(
                        gen,
                        [self.split.train[i].prompt_ids for i in idx],
                        num_generations=self.G,
                        eos=self.eos,
                        pad_id=s.pad_id,
                        max_new_tokens=on.max_new_tokens,
                        temperature=on.temperature,
                        top_p=on.top_p,
                        top_k=on.top_k,
                        seed=seed_of(self.cfg.train.seed, key),
                        generator=on.generator,
                        sampler=on.sampler,
                    )  # fmt: skip
                )
            prompts += [i for i in idx for _ in range(self.G)]
        self._release()
        rollouts = concat(chunks, s.pad_id)
        PHASES.exit("generate")
        t1 = time.time()
        with PHASES.phase("score"):
            scores = self.score(prompts, rollouts, self.split.train)
            combined = self.shape(scores.combined, rollouts.truncated)
            every = gather_rows(s, combined)
            rewards = self.mapped(combined, every)
        t2 = time.time()
        with PHASES.phase("reference"):
            old = self.logps(self.module, rollouts) if self.uses_old else None
            t3 = time.time()
            ref = self.reference_logps(rollouts) if self.uses_ref else None
        t4 = time.time()
        finite = every[~torch.isnan(every)]
        batch_std = float(finite.std()) if finite.numel() > 1 else 0.0
        tokens = float(s.all_sum(rollouts.mask.sum().double().cpu()))
        num_items = tokens / (self.S * s.acc.num_processes)
        per = {name: gather_rows(s, _values(vals)) for name, vals in scores.per_function.items()}
        figures = self.figures(every, per, rollouts)
        self.generations += 1
        for k, v in (("generate", t1 - t0), ("score", t2 - t1), ("old", t3 - t2),
                     ("reference", t4 - t3)):  # fmt: skip
            self.timing[k] = self.timing.get(k, 0.0) + v
        mine = {name: _values(vals) for name, vals in scores.per_function.items()}
        buf = Buffer(prompts, rollouts, rewards, combined, old, ref, batch_std, num_items,
                     figures, mine)  # fmt: skip
        self.log_completions(buf)
        return buf

    # ------------------------------------------------------------------------ rewards
    def score(self, prompts: list[int], rollouts: Rollouts, items: list):
        """The rewards of each completion (decoded text, special tokens stripped), with the
        record's columns; a reward that fails raises `RewardError` naming it and the record
        (the loop adds the last checkpoint)."""
        s = self.session
        ids = rollouts.completion_ids
        texts = [s.tokenizer.decode(c, skip_special_tokens=True) for c in ids]
        rows = [items[i] for i in prompts]
        names = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows] for k in names}
        return self.rewards.score(
            [r.prompt for r in rows], texts, ids, columns, [r.where for r in rows],
            step=self.generations, max_steps=self.cfg.train.max_steps,
        )  # fmt: skip

    def shape(self, combined: Tensor, truncated: Tensor) -> Tensor:
        """`missing_eos_penalty`, then `reward_clip`, on the combined reward (NaN kept)."""
        on = self.cfg.online
        out = combined.double()
        if on.missing_eos_penalty:
            out = missing_eos(out, truncated, on.missing_eos_penalty)
        if on.reward_clip is not None:
            out = clip(out, *on.reward_clip)
        return out

    def mapped(self, combined: Tensor, every: Tensor) -> Tensor:
        """What the objective trains on: the UNA map to [0, 1] where it applies (zscore's running
        statistics updated with every process's rewards of this batch first)."""
        if self.map == "none":
            return combined.float()
        if self.map == "zscore":  # una_map's zscore, its statistics over every process's rows
            self.stats.update(every)
            return torch.sigmoid((combined - self.stats.mean) / max(self.stats.std, 1e-4)).float()
        rng = self.cfg.online.score_range
        return una_map(combined, self.map, range=rng).float()

    def figures(self, every: Tensor, per: dict[str, Tensor], rollouts: Rollouts) -> dict:
        """The generation's figures under TRL's names, over every process's rows: `every` the
        combined reward, `per` each reward's values (NaN where it did not score)."""
        s, G = self.session, self.G
        out: dict[str, float] = {}
        ok = every[~torch.isnan(every)]
        out["reward"] = float(ok.mean()) if ok.numel() else math.nan
        groups = every.view(-1, G)
        stds = torch.stack([_nanstd(g) for g in groups])
        out["reward_std"] = float(stds.nanmean()) if stds.numel() else math.nan
        out["frac_reward_zero_std"] = zero_std_groups(every.float(), G) / max(len(groups), 1)
        out["frac_reward_none"] = float(torch.isnan(every).double().mean())
        for name, t in per.items():
            t = t[~torch.isnan(t)]
            out[f"rewards/{name}/mean"] = float(t.mean()) if t.numel() else math.nan
            out[f"rewards/{name}/std"] = float(t.std()) if t.numel() > 1 else 0.0
        lengths = gather_rows(s, rollouts.lengths.double())
        trunc = gather_rows(s, rollouts.truncated.double())
        out["completions/mean_length"] = float(lengths.mean())
        out["completions/max_length"] = float(lengths.max())
        out["completions/min_length"] = float(lengths.min())
        out["completions/clipped_ratio"] = float(trunc.mean())  # TRL's name: truncated share
        done = lengths[trunc == 0]
        out["completions/mean_terminated_length"] = float(done.mean()) if done.numel() else 0.0
        return out

    # ------------------------------------------------------------------------ log-probs
    def logps(self, module: nn.Module, r: Rollouts, *, grad: bool = False) -> Tensor:
        """Per-token log-probs of the completions at the sampling temperature `[N, T]`, through
        the prepared module (DDP / ZeRO see the forward); without `grad`, no grad, on CPU."""
        s = self.session
        with nullcontext() if grad else torch.no_grad(), s.acc.autocast():
            out = module(
                r.input_ids.to(s.device), r.attention_mask.to(s.device), None,
                objective_forward=rollout_forward, starts=r.starts, width=r.mask.shape[1],
                temperature=self.cfg.online.temperature,
            )  # fmt: skip
        return out if grad else out.float().cpu() * r.mask

    @torch.no_grad()
    def reference_logps(self, r: Rollouts, temperature: float | None = None) -> Tensor:
        """The reference's per-token log-probs at the sampling temperature: the frozen copy, or
        (LoRA, reference at the start) the policy with its adapters switched off."""
        s = self.session
        if self.reference is not None:  # a whole frozen copy: nothing to gather under FSDP
            model, ctx, wrapped = self.reference, nullcontext(), None
        else:
            model, ctx = s.acc.unwrap_model(self.module).model, reference_mode(s.model)
            wrapped = self.module  # FSDP's root unit: the prepared policy
        with ctx, s.acc.autocast(), full_parameters(model, s.engine, wrapped=wrapped):
            out = completion_logps(
                model, r.input_ids.to(s.device), r.attention_mask.to(s.device), r.starts,
                r.mask.shape[1],
                temperature=self.cfg.online.temperature if temperature is None else temperature,
                chunk_size=self.cfg.train.logprob_chunk_size,
            )  # fmt: skip
        return out.float().cpu() * r.mask

    # ------------------------------------------------------------------------ the loss
    def loss(self, pending: Pending) -> Loss:
        """The objective on a served micro-batch, with its figures; `observed` (what a schedule
        watches of this slot, docs/methods.md): minus the micro-batch's mean reward."""
        from unitune.training.policy import Loss

        buf, rows, first = pending.get()
        r = buf.rollouts.rows(rows)
        t0 = time.time()
        logp = self.logps(self.module, r, grad=True)
        mask = r.mask.to(logp.device)
        logp = logp * mask
        if self.uses_old:
            old = buf.old_logp[rows, : mask.shape[1]].to(logp.device)
        else:  # mu == 1: pi_old is the policy itself; the ratio is exactly 1 (TRL)
            old = logp.detach()
        ref = None
        if self.uses_ref:
            ref = buf.ref_logp[rows, : mask.shape[1]].to(logp.device)
        elif getattr(self.params, "reference", None) == "rollout":
            ref = old
        rewards = buf.rewards[rows].to(logp.device)
        lp = RolloutLogps(
            logp, mask, old, ref, rewards, self.G, self.cfg.online.max_new_tokens,
            batch_std=buf.batch_std, num_items=buf.num_items,
        )  # fmt: skip
        value = self.obj.loss(lp, self.params)
        figures = dict(buf.figures)
        with torch.no_grad():
            figures |= self.train_figures(lp, r, first)
        combined = buf.combined[rows]
        ok = combined[~torch.isnan(combined)]
        observed = -float(ok.mean()) if ok.numel() else 0.0
        self.timing["train_forward"] = self.timing.get("train_forward", 0.0) + time.time() - t0
        return Loss(value, int(r.attention_mask.sum()), figures, observed=observed)

    def train_figures(self, lp: RolloutLogps, r: Rollouts, first: bool) -> dict[str, float]:
        """KL to the reference (k3, mean over completion tokens), the clipped share of the
        importance ratios, and on a batch's first use the gap between the sampler's and the
        training pass's log-probs (a stale generator shows here: TRL #5312)."""
        out: dict[str, float] = {}
        m = lp.mask
        n = m.sum().clamp(min=1)
        if lp.ref_logp is not None:
            d = (lp.ref_logp - lp.logp.detach()) * m
            out["kl"] = float(((torch.exp(d) - d - 1) * m).sum() / n)
        eps = getattr(self.params, "epsilon", None)
        if eps is not None:
            ratio = torch.exp(lp.logp.detach() - lp.old_logp) * m
            hi = getattr(self.params, "epsilon_high", eps)
            clipped = ((ratio < 1 - eps) | (ratio > 1 + hi)) & m.bool()
            out["clip_ratio/region_mean"] = float(clipped.sum() / n)
        if first:
            gap = (r.sample_logp.to(m.device) - lp.logp.detach()).abs() * m
            out["sampling/sampling_logp_difference/mean"] = float(gap.sum() / n)
            out["sampling/sampling_logp_difference/max"] = float(gap.max())
            self._warn_gap(out["sampling/sampling_logp_difference/mean"])
        return out

    def _warn_gap(self, mean: float) -> None:
        """One warning when the sampler's log-probs are further from the training pass's than
        `online.max_logp_difference` (mean absolute difference per completion token)."""
        limit = self.cfg.online.max_logp_difference
        if self.warned_gap or limit is None or not mean > limit:
            return
        self.warned_gap = True
        self.session.console.log(
            f"[yellow]warning:[/] the sampler's log-probs differ from the training pass's by "
            f"{mean:.3f} per token on average (online.max_logp_difference: {limit}): a stale or "
            "lower-precision generator; see sampling/sampling_logp_difference in the metrics"
        )

    def take_timing(self) -> dict[str, float]:
        """The seconds of this step spent generating, scoring, in pi_old's and the reference's
        passes (reset)."""
        t, self.timing = self.timing, {}
        return t

    # ------------------------------------------------------------------------ the log
    def log_completions(self, buf: Buffer) -> None:
        """The first `online.log_completions` completions of the batch with their rewards, in
        `<output_dir>/completions/generation-N.jsonl` (main process)."""
        s, k = self.session, self.cfg.online.log_completions
        if not s.main or k == 0:
            return
        ids = buf.rollouts.completion_ids[:k]
        lines = []
        for i, c in enumerate(ids):
            item = self.split.train[buf.prompts[i]]
            rewards = {n: _num(t[i]) for n, t in buf.per_function.items()}
            lines.append(json.dumps({
                "generation": self.generations, "record": item.where, "prompt": item.prompt,
                "completion": s.tokenizer.decode(c, skip_special_tokens=True),
                "rewards": rewards, "reward": _num(buf.combined[i]),
                "trained_on": _num(buf.rewards[i]), "truncated": bool(buf.rollouts.truncated[i]),
                "tokens": len(c),
            }, ensure_ascii=False))  # fmt: skip
        path = s.out / "completions" / f"generation-{self.generations:06d}.jsonl"
        atomic_write(path, "\n".join(lines) + "\n")

    # ------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON of everything that changes, each process's buffer described (a collective:
        every process calls it; `tensors()` holds the buffers' tensors)."""
        metas = [None if self.buffer is None else self.buffer.meta()]
        if self.session.acc.num_processes > 1:
            from accelerate.utils import gather_object

            metas = gather_object(metas)
        return {
            "position": self.position, "generations": self.generations,
            "prompts": self.prompt_stream.state_dict(), "stats": self.stats.state_dict(),
            "world": self.session.acc.num_processes, "buffers": metas,
        }  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        """Every process's buffer tensors as `online.rank<r>.<name>` (a collective)."""
        mine = {} if self.buffer is None else self.buffer.tensors()
        every = [mine]
        if self.session.acc.num_processes > 1:
            from accelerate.utils import gather_object

            every = gather_object(every)
        return {
            f"online.rank{rank}.{name}": t.contiguous()
            for rank, tensors in enumerate(every)
            for name, t in tensors.items()
        }

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        rank, world = self.session.acc.process_index, self.session.acc.num_processes
        if state["world"] != world and any(m is not None for m in state["buffers"]):
            raise RuntimeError(
                f"the checkpoint holds the rollout buffers of {state['world']} processes; "
                f"resume on {state['world']} processes (now {world})"
            )
        self.position, self.generations = int(state["position"]), int(state["generations"])
        self.prompt_stream.load_state_dict(state["prompts"])
        self.stats.load_state_dict(state["stats"])
        meta = state["buffers"][rank] if rank < len(state["buffers"]) else None
        prefix = f"online.rank{rank}."
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.buffer = None if meta is None else Buffer.restore(meta, mine)


# ---------------------------------------------------------------------------------- helpers
def rollout_forward(
    model: nn.Module, input_ids, attention_mask, target_mask, *, chunk_size: int, starts,
    width: int, temperature: float,
) -> Tensor:  # fmt: skip
    """`PolicyLogps`'s objective pass for rollouts: per-token completion log-probs at T."""
    return completion_logps(
        model, input_ids, attention_mask, starts, width,
        temperature=temperature, chunk_size=chunk_size,
    )  # fmt: skip


@contextmanager
def whole_models() -> Iterator[None]:
    """Models loaded inside are whole on each process: DeepSpeed ZeRO-3's `zero.Init`, which
    transformers applies to every `from_pretrained` while a ZeRO-3 config is registered with it
    (`integrations.deepspeed.is_deepspeed_zero3_enabled`), is off for the duration (a reward
    model scores on each process and is not trained). The registration is put back after.
    Without one nothing is imported (importing DeepSpeed warns about the accelerator on a
    machine without CUDA, with its source location)."""
    hf_ds = sys.modules.get("transformers.integrations.deepspeed")
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    if hf_ds is None or saved is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def seed_of(seed: int, key: int) -> int:
    """The sampling seed of global micro-batch `key` of a run seeded `seed`."""
    return derived_seed("rollout", seed, key)


def concat(chunks: list[Rollouts], pad_id: int) -> Rollouts:
    """Rollouts of several micro-batches as one batch (right-padded to the widest)."""
    width = max(c.input_ids.shape[1] for c in chunks)
    t = max(c.mask.shape[1] for c in chunks)

    def pad(x: Tensor, w: int, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, w - x.shape[1]), value=value)

    return Rollouts(
        torch.cat([pad(c.input_ids, width, pad_id) for c in chunks]),
        torch.cat([pad(c.attention_mask, width, 0) for c in chunks]),
        torch.cat([c.starts for c in chunks]),
        torch.cat([pad(c.mask, t, 0.0) for c in chunks]),
        torch.cat([c.truncated for c in chunks]),
        torch.cat([pad(c.sample_logp, t, 0.0) for c in chunks]),
    )


def gather_rows(session: Session, t: Tensor) -> Tensor:
    """`t` of every process, concatenated in rank order (CPU)."""
    if session.acc.num_processes == 1:
        return t
    from accelerate.utils import gather_object

    return torch.cat([torch.as_tensor(x) for x in gather_object([t.cpu()])])


def _values(vals: list) -> Tensor:
    """A reward's values as float64, NaN where it returned None."""
    return torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64)


def _nanstd(x: Tensor) -> Tensor:
    ok = x[~torch.isnan(x)]
    return ok.std(unbiased=True) if ok.numel() > 1 else torch.tensor(math.nan, dtype=x.dtype)


def _num(x: Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v
