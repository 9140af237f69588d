"""Detect a dataset's format and check each record against it.

Formats (TRL's standard ones), detected from the first record's keys:

SFT
- prompt/completion, plain: `{"prompt": str, "completion": str}`
- prompt/completion, conversational: `{"prompt": [messages], "completion": [messages]}`
- messages: `{"messages": [messages]}`; every assistant turn is a target

Preference
- explicit prompt, plain or conversational: `{"prompt", "chosen", "rejected"}`
- implicit prompt: `{"chosen", "rejected"}`, both full conversations (or full texts) sharing a
  prompt. For message lists the prompt is their longest common prefix of messages. For plain
  strings it is their longest common prefix cut back to its last whitespace character, so no
  word is split (the whitespace starts both responses); "Q: 2+2? A: 4" / "Q: 2+2? A: 5" gives
  prompt "Q: 2+2? A:" and responses " 4" / " 5".

A message is `{"role", "content"}` with a string content and a role among `ROLES`; other keys are
passed to the chat template. Every later record must have the first record's shape: the same
fields, strings where it had strings and message lists where it had lists. Fields whose value is
None count as absent (Parquet and `datasets` fill missing columns with None).

Each check raises `RecordError` naming the field and a `reason` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unitune.data.errors import RecordError

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Format:
    kind: str  # "sft" or "preference"
    name: str  # "prompt_completion", "messages", "explicit" or "implicit"
    conversational: bool
    fields: tuple[str, ...]  # required
    forbidden: tuple[str, ...]  # fields of the other formats of the same kind

    def describe(self) -> str:
        style = "conversational" if self.conversational else "plain"
        if self.name == "messages":
            return "messages"
        if self.name == "prompt_completion":
            return f"{style} prompt/completion"
        return f"{style} {self.name}-prompt preference"


@dataclass(frozen=True)
class TextExample:
    """A plain-text prompt and response (the response is the target)."""

    prompt: str
    response: str
    prompt_field: str
    response_field: str


@dataclass(frozen=True)
class ChatExample:
    """A conversation; assistant messages at index >= `first_target` are targets."""

    messages: list[dict[str, Any]]
    first_target: int
    prompt_field: str
    response_field: str


Example = TextExample | ChatExample


def detect_format(record: dict[str, Any], kind: str) -> Format:
    """The format of a dataset, from its first record's keys (and whether values are lists)."""
    present = _present(record)
    if kind == "sft":
        if "messages" in present:
            return Format(kind, "messages", True, ("messages",), ("prompt", "completion"))
        if present & {"prompt", "completion"}:
            first = record["prompt" if "prompt" in present else "completion"]
            conversational = isinstance(first, list)
            fields = ("prompt", "completion")
            return Format(kind, "prompt_completion", conversational, fields, ("messages",))
        expected = "'prompt' and 'completion', or 'messages'"
    elif kind == "preference":
        if present & {"chosen", "rejected"}:
            if "prompt" in present:
                conversational = isinstance(record["prompt"], list)
                return Format(
                    kind, "explicit", conversational, ("prompt", "chosen", "rejected"), ()
                )
            first = record["chosen" if "chosen" in present else "rejected"]
            conversational = isinstance(first, list)
            return Format(kind, "implicit", conversational, ("chosen", "rejected"), ("prompt",))
        expected = "'chosen' and 'rejected', with or without 'prompt'"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    keys = ", ".join(repr(k) for k in sorted(present)) or "none"
    detail = f"cannot detect the format from keys {keys}; expected {expected}"
    raise RecordError(None, "unknown_format", detail)


def validate_sft(record: dict[str, Any], fmt: Format) -> Example:
    _check_shape(record, fmt)
    if fmt.name == "messages":
        messages = _messages(record, "messages")
        return _chat(messages, 0, "messages", "messages")
    if fmt.conversational:
        prompt = _messages(record, "prompt")
        completion = _messages(record, "completion")
        _require_assistant(completion, "completion")
        return _chat(prompt + completion, len(prompt), "prompt", "completion", len(prompt))
    prompt = _string(record, "prompt")
    completion = _non_empty(_string(record, "completion"), "completion")
    return TextExample(prompt, completion, "prompt", "completion")


def validate_preference(record: dict[str, Any], fmt: Format) -> tuple[Example, Example]:
    """Check a preference record; returns the chosen and rejected examples."""
    _check_shape(record, fmt)
    if fmt.conversational:
        chosen, rejected = _messages(record, "chosen"), _messages(record, "rejected")
    else:
        chosen, rejected = _string(record, "chosen"), _string(record, "rejected")
    if chosen == rejected:
        raise RecordError("chosen", "identical", "identical to 'rejected'")

    if fmt.name == "explicit":
        prompt_field = "prompt"
        if fmt.conversational:
            prompt = _messages(record, "prompt")
        else:
            prompt = _string(record, "prompt")
    elif fmt.conversational:
        prompt_field = "chosen"
        n = _common_prefix_length(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt_field = "chosen"
        prompt, chosen, rejected = split_common_text(chosen, rejected)

    if fmt.name == "implicit" and not prompt:
        detail = "'chosen' and 'rejected' share no prompt (add an explicit 'prompt' field)"
        raise RecordError("chosen", "no_common_prompt", detail)
    if fmt.conversational:
        pair = []
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            _require_assistant(response, name)
            base = len(prompt) if fmt.name == "explicit" else 0
            pair.append(_chat(prompt + response, len(prompt), prompt_field, name, base))
        return pair[0], pair[1]
    return (
        TextExample(prompt, _non_empty(chosen, "chosen"), prompt_field, "chosen"),
        TextExample(prompt, _non_empty(rejected, "rejected"), prompt_field, "rejected"),
    )


def split_common_text(a: str, b: str) -> tuple[str, str, str]:
    """(prompt, rest of a, rest of b): the common prefix cut back to its last whitespace."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    if n > 0:
        n -= 1  # the whitespace itself starts the responses
    return a[:n], a[n:], b[n:]


def _common_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _present(record: dict[str, Any]) -> set[str]:
    return {key for key, value in record.items() if value is not None}


def _check_shape(record: dict[str, Any], fmt: Format) -> None:
    present = _present(record)
    for name in fmt.forbidden:
        if name in present:
            detail = f"unexpected in this dataset (its format is {fmt.describe()})"
            raise RecordError(name, "unexpected_field", detail)
    for name in fmt.fields:
        if name not in present:
            detail = f"missing (the dataset's format is {fmt.describe()})"
            raise RecordError(name, "missing_field", detail)


def _type_name(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _string(record: dict[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(name, "wrong_type", f"expected a string, got {_type_name(value)}")
    return value


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise RecordError(name, "empty_response", "empty or whitespace-only response")
    return text


def _messages(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = record[name]
    if not isinstance(value, list):
        detail = f"expected a list of messages, got {_type_name(value)}"
        raise RecordError(name, "wrong_type", detail)
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(name, "wrong_type", f"{where}: expected a message object")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RecordError(name, "missing_field", f"{where}: no '{key}'")
            if not isinstance(message[key], str):
                got = _type_name(message[key])
                raise RecordError(
                    name, "wrong_type", f"{where}: '{key}' must be a string, got {got}"
                )
        if message["role"] not in ROLES:
            detail = f"{where}: unknown role {message['role']!r} (known: {', '.join(ROLES)})"
            raise RecordError(name, "unknown_role", detail)
    return value


def _require_assistant(messages: list[dict[str, Any]], name: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(name, "empty_response", "no assistant message")


def _chat(
    messages: list[dict[str, Any]],
    first_target: int,
    prompt_field: str,
    response_field: str,
    index_base: int = 0,
) -> ChatExample:
    """A `ChatExample`; `index_base` maps message indices back to the response field's own."""
    targets = [i for i in range(first_target, len(messages)) if messages[i]["role"] == "assistant"]
    if not targets:
        raise RecordError(response_field, "empty_response", "no assistant message")
    if targets[0] == 0:
        detail = "the conversation must start with a system or user message, not the response"
        raise RecordError(prompt_field, "missing_prompt", detail)
    for i in targets:
        if not messages[i]["content"].strip():
            detail = f"{response_field}[{i - index_base}]: empty assistant message"
            raise RecordError(response_field, "empty_response", detail)
    return ChatExample(messages, first_target, prompt_field, response_field)
