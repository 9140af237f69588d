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

from typing import Any

from transformers import PreTrainedTokenizerBase

from unitune.data.errors import RecordError
from unitune.data.sequences import Sequence, drop_tail
from unitune.data.validation import ChatExample, Example, TextExample


class Encoder:
    """The few tokenizer operations the data layer needs, set up once per tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
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

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            detail = "conversational data needs a tokenizer with a chat template; this one has none"
            raise RecordError(None, "no_chat_template", detail, fatal=True)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # templates are arbitrary code; report any failure on the record
            raise RecordError(None, "template_error", f"chat template failed: {err}") from err
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text


def tokenize_example(example: Example, encoder: Encoder, max_length: int) -> Sequence:
    """Token ids and target mask of one example, fitted to `max_length` (see module docstring)."""
    if isinstance(example, TextExample):
        ids, mask = _tokenize_text(example, encoder)
    else:
        ids, mask = _tokenize_chat(example, encoder)
    return _fit(ids, mask, max_length, example)


def _tokenize_text(example: TextExample, encoder: Encoder) -> tuple[list[int], list[int]]:
    prompt = encoder.prefix + encoder.encode(example.prompt)
    response = encoder.encode(example.response)
    if not response or response[-1] != encoder.eos_id:
        response.append(encoder.eos_id)
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _tokenize_chat(example: ChatExample, encoder: Encoder) -> tuple[list[int], list[int]]:
    messages = example.messages
    targets = [
        i for i in range(example.first_target, len(messages)) if messages[i]["role"] == "assistant"
    ]
    try:
        full = encoder.render(messages[: targets[-1] + 1], generation_prompt=False)
        ids: list[int] = []
        mask: list[int] = []
        done = 0  # characters of `full` already tokenized
        for i in targets:
            before = encoder.render(messages[:i], generation_prompt=True)
            through = encoder.render(messages[: i + 1], generation_prompt=False)
            if not (
                through.startswith(before) and full.startswith(through) and len(before) >= done
            ):
                raise RecordError(None, "template_prefix", _prefix_problem(i), fatal=True)
            context = encoder.encode(full[done : len(before)])
            ids += context
            mask += [0] * len(context)
            piece = encoder.encode(full[len(before) : len(through)])
            if encoder.eos_id not in piece:
                raise RecordError(None, "template_eos", _eos_problem(encoder), fatal=True)
            last_eos = len(piece) - 1 - piece[::-1].index(encoder.eos_id)
            ids += piece
            mask += [1] * (last_eos + 1) + [0] * (len(piece) - last_eos - 1)
            done = len(through)
    except RecordError as err:
        err.field = err.field or example.response_field
        raise
    return ids, mask


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
