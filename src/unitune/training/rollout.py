"""Rollouts: completions sampled by the policy, cut at their first EOS, as training rows.

`sample(...)` draws `G` completions per prompt with unitune's decode loop
(`unitune.models.decode`: HF `generate`'s tokens, token for token, at less cost per step; or HF
`generate` itself with `generator="hf"`) at the temperature, top-p, top-k and `max_new_tokens`
asked, from a generator seeded by the caller, so a rollout is a pure function of the
weights, the prompts and the seed: a resumed run samples exactly what the uninterrupted one did.
Each completion ends at its first EOS, whichever of the model's EOS ids it is (Phi-3.5 has
several: TRL PR #7039); that EOS is a target token and everything after it is masked, whatever
the pad token is (pad == EOS: TRL PR #4970; text after EOS trained on: TRL PR #2708). A
completion with no EOS within `max_new_tokens` is *truncated*. The sampler's own log-probs
(`sample_logp`: `log softmax(logits / T)` of the drawn tokens, from the sampler's logits) are kept,
so that the training pass can be checked against them (a stale generator: TRL #5312).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from unitune.eval.generate import forked_rng, left_pad
from unitune.models.decode import decode
from unitune.models.modes import eval_mode

if TYPE_CHECKING:
    from unitune.models.vllm_generator import VllmGenerator
    from unitune.training.engines import Engine


@dataclass
class Rollouts:
    """One batch of sampled completions, `N = P * G` rows, prompt `i`'s samples at rows
    `i*G .. i*G + G - 1`. `input_ids` / `attention_mask` are right-padded rows `prompt +
    completion` (the completion up to and including its first EOS); `starts[b]` is row `b`'s
    prompt length; `mask[b, t]` marks completion token `t` of row `b`, `[N, T]`."""

    input_ids: Tensor  # [N, L] long
    attention_mask: Tensor  # [N, L] long
    starts: Tensor  # [N] long
    mask: Tensor  # [N, T] float
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    sample_logp: Tensor  # [N, T] float: the sampler's log-probs of the drawn tokens (0 masked)

    @property
    def completion_ids(self) -> list[list[int]]:
        """Each row's completion tokens (its EOS included when it has one)."""
        out = []
        for row, start, n in zip(
            self.input_ids.tolist(), self.starts.tolist(), self.lengths.tolist(), strict=True
        ):
            out.append(row[start : start + n])
        return out

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1).long()

    def rows(self, index: slice) -> Rollouts:
        """Rows `index` as a `Rollouts`, trimmed to their own widths."""
        am = self.attention_mask[index]
        width = int(am.sum(dim=1).max()) if am.numel() else 0
        mask = self.mask[index]
        t = int(mask.sum(dim=1).max()) if mask.numel() else 0
        return Rollouts(
            self.input_ids[index, :width], am[:, :width], self.starts[index], mask[:, :t],
            self.truncated[index], self.sample_logp[index, :t],
        )  # fmt: skip


def cut_at_eos(new: Tensor, eos: list[int], max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """(mask [N, T], truncated [N]) of generated tokens `new`: each row's tokens up to and
    including its first token that is any of `eos`; a row with none is truncated when it ran to
    `max_new_tokens` (generation stops early only when every row has ended). The pad token plays
    no part, so pad == EOS cannot hide the end or the padding."""
    n, t = new.shape
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in eos:
        is_eos |= new == e
    any_eos = is_eos.any(dim=1)
    first = torch.where(any_eos, is_eos.int().argmax(dim=1), torch.full((n,), t, device=new.device))
    length = torch.where(any_eos, first + 1, torch.full_like(first, t))
    mask = (torch.arange(t, device=new.device)[None, :] < length[:, None]).float()
    truncated = ~any_eos & (t >= max_new_tokens)
    return mask, truncated


@torch.no_grad()
def sample(
    model: nn.Module | VllmGenerator,
    prompts: list[list[int]],
    *,
    num_generations: int,
    eos: list[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    do_sample: bool = True,
    generator: str = "unitune",
    sampler: str = "inverse_cdf",
) -> Rollouts:
    """`num_generations` completions of each prompt (token ids), drawn with torch's RNG seeded
    with `seed` inside a fork (the caller's random state does not move). `do_sample=False`:
    greedy (the held-out answers). `model` is what generates: the policy or its generation copy
    (`models.generation_copy`); it is put in eval mode and given back as it was. `generator`:
    "unitune" (the decode loop), "hf" (`model.generate`) or "vllm" (`model` is then a
    `models.vllm_generator.VllmGenerator` holding the policy's weights); `sampler`: the decode
    loop's draw
    (`models.decode.draw`: "multinomial" draws `generate`'s tokens for the same seed,
    "inverse_cdf" the same distribution at less cost)."""
    rows = [p for p in prompts for _ in range(num_generations)]
    if generator == "vllm":
        return _vllm_sample(model, rows, eos=eos, pad_id=pad_id, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            do_sample=do_sample)  # fmt: skip
    device = next(model.parameters()).device
    ids, attn = left_pad(rows, pad_id, device)
    if generator == "hf":
        new, logits = _hf_generate(model, ids, attn, eos, pad_id, max_new_tokens, do_sample,
                                   temperature, top_p, top_k, seed)  # fmt: skip
        drawn = torch.log_softmax(logits / temperature, dim=-1).gather(-1, new[..., None])[..., 0]
    else:
        with eval_mode(model), forked_rng(device, seed):
            out = decode(model, ids, attn, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                         do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                         logps=True, sampler=sampler)  # fmt: skip
        new, drawn = out.tokens, out.logp
        assert drawn is not None
    mask, truncated = cut_at_eos(new, eos, max_new_tokens)
    return _rows(rows, new, drawn, mask, truncated, pad_id)


def _rows(
    rows: list[list[int]], new: Tensor, drawn: Tensor, mask: Tensor, truncated: Tensor, pad_id: int
) -> Rollouts:
    """`Rollouts` of prompts `rows` and their new tokens `[N, T]`, their masks (each row's
    completion) and the sampler's log-probs of them."""
    sample_logp = drawn * mask
    lengths = mask.sum(dim=1).long().tolist()
    seqs = [r + c[:n] for r, c, n in zip(rows, new.tolist(), lengths, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
    starts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return Rollouts(input_ids, attention, starts, mask.cpu(), truncated.cpu(), sample_logp.cpu())


def _vllm_sample(
    engine: VllmGenerator, rows: list[list[int]], *, eos: list[int], pad_id: int,
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
    do_sample: bool,
) -> Rollouts:  # fmt: skip
    """`rows`' completions from a vLLM engine (`models.vllm_generator`), each row drawn with its
    own seed (`row_seed`). vLLM stops a row at its first EOS (kept) or at `max_new_tokens`, or
    at the engine's `max_model_len`: a row that does not end with an EOS is truncated, and only
    its own tokens are in the mask."""
    seeds = [row_seed(seed, i) for i in range(len(rows))]
    tokens, logps = engine.generate(
        rows, seeds=seeds, max_new_tokens=max_new_tokens, eos=eos, do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k,
    )  # fmt: skip
    width = max([len(t) for t in tokens] + [1])
    new = torch.full((len(rows), width), pad_id, dtype=torch.long)
    drawn = torch.zeros((len(rows), width))
    mask = torch.zeros((len(rows), width))
    for i, (t, lp) in enumerate(zip(tokens, logps, strict=True)):
        new[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        drawn[i, : len(t)] = torch.tensor(lp)
        mask[i, : len(t)] = 1.0
    truncated = torch.tensor([not t or t[-1] not in eos for t in tokens], dtype=torch.bool)
    return _rows(rows, new, drawn, mask, truncated, pad_id)


def derived_seed(kind: str, seed: int, key: int) -> int:
    """A 63-bit seed drawn from (`kind`, `seed`, `key`) by SHA-256: unrelated streams for
    neighbouring keys, the same on every process and in every resumed run."""
    h = hashlib.sha256(f"unitune-{kind}|{seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of row `row` of a chunk sampled with `seed` (vLLM's per-request seed)."""
    return derived_seed("row", seed, row)


def _hf_generate(
    model: nn.Module, ids: Tensor, attn: Tensor, eos: list[int], pad_id: int,
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """HF `generate`'s new tokens [N, T] and raw logits [N, T, V] (float32)."""
    from transformers import GenerationConfig

    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos,
        pad_token_id=pad_id, use_cache=True, output_logits=True, return_dict_in_generate=True,
        **options,
    )  # fmt: skip
    with eval_mode(model), forked_rng(ids.device, seed):
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).float()


@contextlib.contextmanager
def full_parameters(
    model: nn.Module, engine: Engine, wrapped: nn.Module | None = None
) -> Iterator[None]:
    """The whole of `model`'s parameters present on every process for a rollout under an engine
    that shards them, gathered once for the whole `with` block rather than layer by layer on
    each forward (which, token by token, would cost one collective per layer per token; TRL
    gathers once for generation too: `unwrap_model_for_generation`). Every process must enter
    it (the gathers are collectives). A no-op under one process, DDP and ZeRO-1/2.

    - DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` over all of `model`'s parameters
      (read-only: nothing is written back).
    - FSDP1 (`FullyShardedDataParallel`): `FSDP.summon_full_params(root, recurse=True,
      writeback=False)` on the root unit, and for the block each FSDP unit inside `model` is
      replaced by the module it wraps, so that generation runs the plain modules on the full
      parameters (through the units, each forward would free the unit's gathered parameters
      after it and gather them again on the next token). `summon_full_params` gives them in
      full precision, whatever FSDP1's mixed-precision policy (autocast still applies).
    - FSDP2 (`fully_shard`, `FSDPModule`): every unit under the root is unsharded once
      (`FSDPModule.unshard`, in its all-gather dtype: the mixed-precision policy's
      `param_dtype`) with its resharding after forward switched off
      (`set_reshard_after_forward(False)`), then resharded (`FSDPModule.reshard`) and its
      setting given back on exit.

    `wrapped` is the prepared module that holds `model` (what `Accelerator.prepare` returned),
    where FSDP's root unit is; it defaults to `model`. A `model` without any FSDP unit (a frozen
    reference copied before `prepare`) needs nothing gathered. `engine` is the run's
    `engines.Engine`.
    """
    root = model if wrapped is None else wrapped
    if engine.kind == "deepspeed" and engine.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
        return
    if engine.kind != "fsdp":
        yield
        return
    fsdp1, fsdp2 = _fsdp_classes()
    if not any(isinstance(m, fsdp1 | fsdp2) for m in root.modules()):
        yield  # nothing sharded: e.g. a frozen reference copied before `prepare`
    elif isinstance(root, fsdp1) and getattr(root, "_is_root", None) is not False:
        with fsdp1.summon_full_params(root, recurse=True, writeback=False):
            with _fsdp1_units_bypassed(model, fsdp1):
                yield
    elif isinstance(root, fsdp2):
        with _fsdp2_unsharded(root, fsdp2):
            yield
    else:
        raise RuntimeError(
            "full_parameters: the module given holds FSDP units but is not FSDP's root unit; "
            "pass the prepared module (what Accelerator.prepare returned) as `wrapped`"
        )


def _fsdp_classes() -> tuple[type, type]:
    """(FSDP1's `FullyShardedDataParallel`, FSDP2's `FSDPModule`), imported only under FSDP.
    `FSDPModule` is exported by `torch.distributed.fsdp` (torch 2.6 on), earlier by
    `torch.distributed._composable.fsdp`; a torch without FSDP2 gets a class that no module is
    an instance of."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:

            class FSDPModule:  # noqa: N801 - no FSDP2 in this torch
                pass

    return FullyShardedDataParallel, FSDPModule


@contextlib.contextmanager
def _fsdp1_units_bypassed(model: nn.Module, fsdp1: type) -> Iterator[None]:
    """Each FSDP1 unit inside `model` replaced in its parent by the module it wraps (its
    `.module`), put back on exit. Only inside `summon_full_params`, where the wrapped modules
    hold the full parameters."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, fsdp1):
                swapped.append((parent, name, child))
    try:
        for parent, name, unit in swapped:
            parent._modules[name] = unit.module
        yield
    finally:
        for parent, name, unit in reversed(swapped):
            parent._modules[name] = unit


@contextlib.contextmanager
def _fsdp2_unsharded(root: nn.Module, fsdp2: type) -> Iterator[None]:
    """Every FSDP2 unit under `root` unsharded once for the block, not resharded by its forward
    hooks, resharded on exit, its reshard-after-forward setting given back as it was.

    torch (read in 2.13: `torch/distributed/fsdp/_fully_shard/`) has no public way to run FSDP2's
    root lazy init (it runs on the root's first forward) nor to read a unit's
    reshard-after-forward setting: both go through the unit's state (`_get_fsdp_state()`). The
    root is initialised here because a rollout may come before any forward of the root, and the
    forward of an uninitialised inner unit would make that unit a root of its own (then the
    real root's first forward fails)."""
    state = root._get_fsdp_state()
    state._lazy_init()
    if not state._is_root:
        raise RuntimeError(
            "full_parameters: the FSDP2 module given is not the root unit; pass the prepared "
            "module (what Accelerator.prepare returned) as `wrapped`"
        )
    units = [m for m in root.modules() if isinstance(m, fsdp2)]
    saved, seen = [], set()
    for unit in units:
        st = unit._get_fsdp_state()
        if id(st) not in seen:
            seen.add(id(st))
            groups = [(g, g.post_forward_mesh_info) for g in _param_groups(st)]
            saved.append((st, getattr(st, "_auto_reshard_after_forward", None), groups))
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for st, auto, groups in saved:
            if auto is not None:
                st._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


def _param_groups(state) -> list:
    """An FSDP2 state's parameter groups: `_fsdp_param_groups` (torch 2.13: several per unit
    with per-parameter meshes), else (older torch) its one `_fsdp_param_group`, or none."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []
