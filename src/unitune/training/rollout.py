"""Rollouts: completions sampled by the policy, cut at their first EOS, as training rows.

`sample(...)` draws `G` completions per prompt with HF `generate` (temperature, top-p, top-k,
`max_new_tokens`) from a generator seeded by the caller, so a rollout is a pure function of the
weights, the prompts and the seed: a resumed run samples exactly what the uninterrupted one did.
Each completion ends at its first EOS, whichever of the model's EOS ids it is (Phi-3.5 has
several: TRL PR #7039); that EOS is a target token and everything after it is masked, whatever
the pad token is (pad == EOS: TRL PR #4970; text after EOS trained on: TRL PR #2708). A
completion with no EOS within `max_new_tokens` is *truncated*. The sampler's own log-probs
(`sample_logp`: `log softmax(logits / T)` of the drawn tokens, from `generate`'s logits) are kept,
so that the training pass can be checked against them (a stale generator: TRL #5312).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unitune.eval.generate import forked_rng, left_pad
from unitune.models.modes import eval_mode


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
    model: nn.Module,
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
) -> Rollouts:
    """`num_generations` completions of each prompt (token ids), drawn with torch's RNG seeded
    with `seed` inside a fork (the caller's random state does not move). `do_sample=False`:
    greedy (the held-out answers). The model is put in eval mode and given back as it was."""
    from transformers import GenerationConfig

    rows = [p for p in prompts for _ in range(num_generations)]
    device = next(model.parameters()).device
    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos,
        pad_token_id=pad_id, use_cache=True, output_logits=True, return_dict_in_generate=True,
        **options,
    )  # fmt: skip
    ids, attn = left_pad(rows, pad_id, device)
    with eval_mode(model), forked_rng(device, seed):
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    new = out.sequences[:, ids.shape[1] :]
    mask, truncated = cut_at_eos(new, eos, max_new_tokens)
    logits = torch.stack(out.logits, dim=1).float()  # [N, T, V] before any logits processor
    drawn = torch.log_softmax(logits / temperature, dim=-1).gather(-1, new[..., None])[..., 0]
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


@contextlib.contextmanager
def full_parameters(model: nn.Module, engine) -> Iterator[None]:
    """The whole model's parameters present for generation under an engine that shards them
    (DeepSpeed ZeRO-3: gathered layer by layer would cost a collective per token, so all are
    gathered once for the whole rollout, as TRL's `unwrap_model_for_generation`); a no-op
    otherwise."""
    if getattr(engine, "name", "") == "deepspeed" and getattr(engine, "zero_stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield
