"""unitune's decode loop: batched autoregressive generation with a KV cache, the LM head applied
to the last position only, token for token what Hugging Face `generate` draws.

It follows `GenerationMixin._sample` of transformers 5.x step by step, without what costs time
there on a CPU and changes nothing here (the logits processor and stopping-criteria machinery,
a copy of the whole sequence and its clone at every step, the output bookkeeping):

- positions: `cumsum(attention_mask) - 1`, 0 on left padding; each new token at the last
  position + 1, the attention mask grown by a column of ones;
- the forward: the model's own, with its KV cache (a `DynamicCache` built from the model's
  config) and `logits_to_keep=1` where the forward takes it; the last position's logits in
  float32;
- greedy: argmax; sampling: temperature, then top-k, then top-p (HF's warpers, in HF's order and
  with HF's ties), softmax, then a draw from the result: `sampler="multinomial"` is one
  `torch.multinomial` over the whole batch per step, as `generate`, so the same seed draws the
  same tokens as `generate` with the same options; `sampler="inverse_cdf"` draws the same
  distribution from one uniform number per row (the first token whose cumulative probability,
  summed in float64, exceeds it), where `torch.multinomial` draws an exponential number for
  every token of the vocabulary (11 ms a step for 8 rows of SmolLM2's 49,152 tokens on a 2-core
  Xeon: an eighth of a decoding step), so other tokens for the same seed;
- a row that has drawn any of `eos` gets `pad_id` from then on; decoding stops when every row
  has ended or after `max_new_tokens`.

With `logps=True` it also returns `log softmax(logits / temperature)` of each drawn token (the
sampler's log-probability, before top-k / top-p), what the online trainer compares with its own
pass. A transformers streamer gets the prompt, then each new token, then `end()`.

Options a model's own `generation_config` may carry (repetition penalty, min length, ...) are
not read: callers pass what they want, as they did with a fresh `GenerationConfig`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Decoded:
    """New tokens `[N, T]` (`pad_id` after a row's end; T <= max_new_tokens) and, when asked,
    the sampler's log-probability of each, float32 `[N, T]`."""

    tokens: Tensor
    logp: Tensor | None


def _forward_params(model: Any) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _new_cache(model: Any, room: int) -> Any:
    """HF's `DynamicCache` for the model, its full-attention layers reserving `room` more
    positions after the prompt (`_Reserved`)."""
    from transformers import DynamicCache

    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        cache = DynamicCache(config=text)
    except TypeError:  # transformers releases whose DynamicCache takes no config
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        from transformers.cache_utils import DynamicLayer

        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[i] = _reserved(DynamicLayer)(room)  # one class, made once
    return cache


@functools.cache
def _reserved(base: type) -> type:
    class _Reserved(base):
        """HF's `DynamicLayer` that writes each new key and value into a buffer reserved for
        the whole generation instead of concatenating (copying) the whole cache every step;
        `keys` / `values` are views of the filled part, as `DynamicLayer` keeps them."""

        def __init__(self, room: int) -> None:
            super().__init__()
            self.room = room
            self.length = 0

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kw: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                n, h, t, _ = key_states.shape
                cap = t + self.room
                self._k = key_states.new_empty((n, h, cap, key_states.shape[-1]))
                self._v = value_states.new_empty((n, h, cap, value_states.shape[-1]))
            t = key_states.shape[-2]
            if self.length + t > self._k.shape[-2]:  # more than reserved: grow, as HF would
                self._k = torch.cat([self._k[..., : self.length, :], key_states], dim=-2)
                self._v = torch.cat([self._v[..., : self.length, :], value_states], dim=-2)
            else:
                self._k[..., self.length : self.length + t, :] = key_states
                self._v[..., self.length : self.length + t, :] = value_states
            self.length += t
            self.keys = self._k[..., : self.length, :]
            self.values = self._v[..., : self.length, :]
            return self.keys, self.values

    return _Reserved


SAMPLERS = ("multinomial", "inverse_cdf")


def draw(probs: Tensor, sampler: str) -> Tensor:
    """One token per row of `probs` [N, V] (rows sum to 1): `torch.multinomial` or the inverse
    of the cumulative distribution at one uniform number per row (never a token of probability
    0)."""
    if sampler == "multinomial":
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return index.clamp_(max=probs.shape[-1] - 1)


def warp(scores: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """HF's sampling warpers on float32 scores `[N, V]`, in `generate`'s order: temperature
    (skipped at 1), top-k (every score below the k-th largest to -inf; 0 is off), top-p (the
    smallest set of the most likely tokens whose probability reaches `top_p`; 1 is off)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, index, drop), -float("inf"))
    return scores


@torch.no_grad()
def decode(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos: list[int],
    pad_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    logps: bool = False,
    streamer: Any = None,
    sampler: str = "multinomial",
) -> Decoded:
    """Up to `max_new_tokens` new tokens for each left-padded row of `input_ids` (see the
    module docstring). Draws from torch's global RNG: seed it (in a fork) for repeatable
    samples."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    params = _forward_params(model)
    cache_key = "cache" if "cache" in params else "past_key_values"
    kwargs: dict[str, Any] = {"use_cache": True, cache_key: _new_cache(model, max_new_tokens)}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    n = input_ids.shape[0]
    device = input_ids.device
    mask = attention_mask.long()
    positions = None
    if "position_ids" in params:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    eos_t = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    unfinished = torch.ones(n, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    drawn_logp: list[Tensor] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    step_ids = input_ids
    for t in range(max_new_tokens):
        if positions is not None:
            kwargs["position_ids"] = positions
        out = model(input_ids=step_ids, attention_mask=mask, **kwargs)
        cache = getattr(out, cache_key, None)
        if cache is not None:
            kwargs[cache_key] = cache
        logits = out.logits[:, -1].float()
        del out
        if do_sample:
            nxt = draw(warp(logits, temperature, top_k, top_p).softmax(dim=-1), sampler)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, pad)
        tokens.append(nxt)
        if logps:
            scaled = logits / temperature if temperature != 1.0 else logits
            drawn_logp.append(scaled.log_softmax(-1).gather(-1, nxt[:, None])[:, 0])
        if streamer is not None:
            streamer.put(nxt.cpu())
        unfinished &= ~torch.isin(nxt, eos_t)
        if t + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
        if positions is not None:
            positions = positions[:, -1:] + 1
    if streamer is not None:
        streamer.end()
    return Decoded(torch.stack(tokens, dim=1), torch.stack(drawn_logp, dim=1) if logps else None)
