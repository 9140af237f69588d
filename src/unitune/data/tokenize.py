"""Turn validated examples into `Sequence`s of token ids and target masks.

Plain text: the prompt is tokenized with the tokenizer's leading special tokens (BOS, if it adds
one; never a trailing one), the response without special tokens, and EOS is appended unless the
response already ends with it. Only response tokens are targets.

Conversations go through the tokenizer's chat template. For each target assistant message `i`
the text before it is `template(messages[:i], add_generation_prompt=True)` and the text up to
its end is `template(messages[:i+1])`; each must be a prefix of the next rendering (the prefix
property), otherwise the template is rejected. The pieces between those boundaries are tokenized
separately (without added special tokens), so prompt tokens are exactly the tokens the model sees
before generating. In a target piece the tokens after its last EOS (e.g. the "\\n" that ChatML
writes after `<|im_end|>`) are not targets, and a piece without EOS is an error: the template
must close assistant turns with the tokenizer's EOS token.

Position 0 is never a target. Tokens after the last target token are dropped (never scored).

Truncation policy:
    The prompt (everything before the first target token) is never cut: if it leaves no room
    for at least one response token within `max_length`, the record is an error ("too_long").
    Otherwise a sequence longer than `max_length` is cut from its end to `max_length` tokens,
    so the response loses its end (and its EOS), and `Sequence.truncated` is set. For
    multi-turn conversations the whole sequence is cut the same way: later turns are lost,
    earlier ones are kept, and non-target tokens left at the end after the cut are dropped.
    The loader counts truncated records in `DataReport.truncated` (a pair counts once).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.data.errors import RecordError
from unitune.data.sequences import Sequence, drop_tail
from unitune.data.validation import ChatExample, Example, TextExample


class Encoder:
    """The few tokenizer operations the data layer needs, set up once per tokenizer."""

    RENDER_MEMO = 16  # renderings kept: a pair's chosen and rejected share their prompt's

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)  # fast (Rust) tokenizers
        self._batch = getattr(backend, "encode_batch_fast", None) or getattr(
            backend, "encode_batch", None
        )
        self._memo: dict[tuple[Any, bool], str] = {}
        self.prefix = self._leading_special_ids()

    def _leading_special_ids(self) -> list[int]:
        """The ids the tokenizer puts before a text (e.g. BOS) when adding special tokens."""
        probe = "Hello"
        bare = self.encode(probe)
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return list(full[:start])
        return []

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in one batched call of the fast tokenizer when there is one."""
        if self._batch is None:
            return [self.encode(t) for t in texts]
        return [e.ids if t else [] for t, e in zip(texts, self._batch(texts, False), strict=True)]

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            detail = "conversational data needs a tokenizer with a chat template; this one has none"
            raise RecordError(None, "no_chat_template", detail, fatal=True)
        plain = all(_plain_message(m) for m in messages)
        key = (
            tuple(tuple(m.items()) for m in messages)
            if plain
            else json.dumps(messages, sort_keys=True, default=repr),
            generation_prompt,
        )
        if key in self._memo:
            return self._memo[key]
        try:
            if plain and self._template is not None:
                text = self._template(messages=messages, add_generation_prompt=generation_prompt)
            else:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt
                )
        except Exception as err:  # templates are arbitrary code; report any failure on the record
            raise RecordError(None, "template_error", f"chat template failed: {err}") from err
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        if len(self._memo) >= self.RENDER_MEMO:
            self._memo.clear()
        self._memo[key] = text
        return text

    @functools.cached_property
    def _template(self) -> Callable[..., str] | None:
        """The chat template as transformers compiles it (its own sandboxed Jinja environment),
        to render messages of plain strings without `apply_chat_template`'s per-call work (its
        normalisation leaves such messages unchanged: ~2x faster loading of chat data). Used only
        if it renders a probe conversation exactly as `apply_chat_template` does; else None. Built
        at the first rendering, so a load served from the data cache never compiles it."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(self.tokenizer.get_chat_template())
            special = dict(self.tokenizer.special_tokens_map)
            render = functools.partial(template.render, tools=None, documents=None, **special)
            probe = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi {{ there }} <b>"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again?"},
            ]
            for gen, msgs in ((True, probe[:2]), (False, probe[:3]), (True, probe)):
                ours = render(messages=msgs, add_generation_prompt=gen)
                theirs = self.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen
                )
                if ours != theirs:
                    return None
        except Exception:  # another transformers, or a template that fails on the probe
            return None
        return render


def _plain_message(message: dict[str, Any]) -> bool:
    """Only string values, none of them a reasoning field transformers renames: a message that
    `apply_chat_template` passes to the template as it is."""
    return all(type(v) is str for v in message.values()) and not (
        "reasoning" in message or "thinking" in message or "reasoning_content" in message
    )


# How a piece of text becomes tokens and targets (`Plan.pieces`):
CONTEXT = 0  # not a target
RESPONSE = 1  # a plain-text response: all targets, EOS appended unless it ends with EOS
TURN = 2  # an assistant turn rendered by the chat template: targets up to its last EOS


@dataclass
class Plan:
    """An example as texts to encode, before any token exists: `pieces` are (text, role)
    pairs; `prefix` puts the tokenizer's leading special ids first (plain text). Texts of many
    plans are encoded in one batched call, then `assemble` builds each `Sequence`."""

    example: Example
    pieces: list[tuple[str, int]]
    prefix: bool = False


def plan_example(example: Example, encoder: Encoder) -> Plan:
    """The texts of one example (chat templates rendered here; see the module docstring)."""
    if isinstance(example, TextExample):
        return Plan(example, [(example.prompt, CONTEXT), (example.response, RESPONSE)], True)
    return Plan(example, _chat_pieces(example, encoder))


def assemble(plan: Plan, encoded: list[list[int]], encoder: Encoder, max_length: int) -> Sequence:
    """Token ids and target mask of a planned example from its pieces' ids, fitted to
    `max_length`."""
    ids: list[int] = list(encoder.prefix) if plan.prefix else []
    mask: list[int] = [0] * len(ids)
    for (_, role), piece in zip(plan.pieces, encoded, strict=True):
        if role == CONTEXT:
            ids += piece
            mask += [0] * len(piece)
        elif role == RESPONSE:
            piece = list(piece)
            if not piece or piece[-1] != encoder.eos_id:
                piece.append(encoder.eos_id)
            ids += piece
            mask += [1] * len(piece)
        else:
            if encoder.eos_id not in piece:
                field = plan.example.response_field
                raise RecordError(field, "template_eos", _eos_problem(encoder), fatal=True)
            last_eos = len(piece) - 1 - piece[::-1].index(encoder.eos_id)
            ids += piece
            mask += [1] * (last_eos + 1) + [0] * (len(piece) - last_eos - 1)
    return _fit(ids, mask, max_length, plan.example)


def _chat_pieces(example: ChatExample, encoder: Encoder) -> list[tuple[str, int]]:
    messages = example.messages
    targets = [
        i for i in range(example.first_target, len(messages)) if messages[i]["role"] == "assistant"
    ]
    try:
        full = encoder.render(messages[: targets[-1] + 1], generation_prompt=False)
        pieces: list[tuple[str, int]] = []
        done = 0  # characters of `full` already planned
        for i in targets:
            before = encoder.render(messages[:i], generation_prompt=True)
            through = encoder.render(messages[: i + 1], generation_prompt=False)
            if not (
                through.startswith(before) and full.startswith(through) and len(before) >= done
            ):
                raise RecordError(None, "template_prefix", _prefix_problem(i), fatal=True)
            pieces.append((full[done : len(before)], CONTEXT))
            pieces.append((full[len(before) : len(through)], TURN))
            done = len(through)
    except RecordError as err:
        err.field = err.field or example.response_field
        raise
    return pieces


def _prefix_problem(index: int) -> str:
    return (
        f"the chat template breaks the prefix property at message {index}: rendering the "
        "conversation before it (with the generation prompt) is not a prefix of rendering it "
        "with this message, or that is not a prefix of the whole conversation; targets cannot "
        "be located with this template"
    )


def _eos_problem(encoder: Encoder) -> str:
    eos = encoder.tokenizer.eos_token
    return (
        f"the chat template does not end assistant turns with the EOS token {eos!r}; use a "
        "template that does, or set tokenizer.eos_token to the token that ends a turn"
    )


def _fit(ids: list[int], mask: list[int], max_length: int, example: Example) -> Sequence:
    if mask:
        mask[0] = 0  # position 0 has no context: never a target
    ids, mask = drop_tail(ids, mask)
    if not ids:
        detail = "no response token can be scored (position 0 is never a target; add a prompt)"
        raise RecordError(example.response_field, "no_target", detail)
    prompt_length = mask.index(1)
    if prompt_length >= max_length:
        detail = (
            f"cannot fit: the prompt is {prompt_length} tokens, max_length {max_length} leaves "
            "no room for a response token"
        )
        raise RecordError(example.prompt_field, "too_long", detail)
    truncated = len(ids) > max_length
    if truncated:
        ids, mask = drop_tail(ids[:max_length], mask[:max_length])
    return Sequence(tuple(ids), tuple(mask), truncated)
