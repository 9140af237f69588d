"""Detect a dataset's format and check each record against it.

Formats (TRL's standard ones), detected from the first record's keys:

SFT
- prompt/completion, plain: `{"prompt": str, "completion": str}`
- prompt/completion, conversational: `{"prompt": [messages], "completion": [messages]}`
- messages: `{"messages": [messages]}`; every assistant turn is a target
- alpaca (a named format, asked for with `format="alpaca"`): `{"instruction": str, "input": str
  (optional), "output": str}`. The record becomes a conversation of one user and one assistant
  message: the user message is `instruction`, or `instruction + "\n\n" + input` when `input` is
  present and not whitespace-only; the assistant message (the target) is `output`. It is
  tokenized through the chat template like conversational prompt/completion data.

Preference pairs
- explicit prompt, plain or conversational: `{"prompt", "chosen", "rejected"}`
- prompt repeated in the conversations (HuggingFaceH4/ultrafeedback_binarized): `prompt` a string
  and `chosen`/`rejected` full conversations that start with it. As TRL's `maybe_extract_prompt`,
  the prompt is the conversations' longest common prefix of messages, the rest the responses;
  the string `prompt` must be the content of a user message of that prefix (compared without
  surrounding whitespace), else the record is refused ("prompt_mismatch").
- implicit prompt: `{"chosen", "rejected"}`, both full conversations (or full texts) sharing a
  prompt. For message lists the prompt is their longest common prefix of messages. For plain
  strings it is their longest common prefix cut back to its last whitespace character, so no
  word is split (the whitespace starts both responses); "Q: 2+2? A: 4" / "Q: 2+2? A: 5" gives
  prompt "Q: 2+2? A:" and responses " 4" / " 5".

Unpaired feedback (one completion per prompt, TRL's unpaired preference format)
- label: `{"prompt", "completion", "label"}`, `label` a JSON boolean (true = desirable); TRL's
  KTO format. 0/1 and strings are rejected: a label is true or false.
- score: `{"prompt", "completion", "score"}`, `score` a finite number (not a boolean) inside the
  range declared for the dataset (`data.pref.score_range`); mapped to [0, 1] as
  `(score - lo) / (hi - lo)`.
- prompt/completion are plain strings or message lists, validated and tokenized exactly as SFT
  prompt/completion. A dataset holds labels or scores, not both.

A message is `{"role", "content"}` with a string content and a role among `ROLES`; other keys are
passed to the chat template. Every later record must have the first record's shape: the same
fields, strings where it had strings and message lists where it had lists. Fields whose value is
None count as absent (Parquet and `datasets` fill missing columns with None).

Fields a format does not read (e.g. UltraFeedback's `prompt_id`, `messages`, `score_chosen`)
are ignored; the loader counts them (`unused_fields`, `DataReport.unused_columns`).

Named formats (`NAMED_FORMATS`) are the ones a dataset asks for by name instead of being
detected from its keys: the fields a format reads and one function from a record to its
example(s). A new one is a function and one `register_format` line; alpaca is registered so.

Each check raises `RecordError` naming the field and a `reason` key.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unitune.data.errors import RecordError

ROLES = ("system", "developer", "user", "assistant", "tool")
FEEDBACK_FIELDS = ("label", "score")


@dataclass(frozen=True)
class Format:
    kind: str  # "demonstrations", "pairs" or "unpaired"
    # "prompt_completion", "messages", "alpaca", "explicit", "repeated", "implicit", "label" or
    # "score"
    name: str
    conversational: bool
    fields: tuple[str, ...]  # required
    forbidden: tuple[str, ...]  # fields of the other formats of the same kind
    optional: tuple[str, ...] = ()  # read when present

    @property
    def used(self) -> tuple[str, ...]:
        """Every field the format reads; the others are unused."""
        return self.fields + self.optional

    def describe(self) -> str:
        style = "conversational" if self.conversational else "plain"
        if self.kind == "unpaired":
            return f"{style} {self.name} feedback"
        if self.name == "messages":
            return "messages"
        if self.name in NAMED_FORMATS:
            return NAMED_FORMATS[self.name].description
        if self.name == "repeated":
            return "conversational preference with the prompt repeated in chosen/rejected"
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


@dataclass(frozen=True)
class NamedFormat:
    """A record format a dataset asks for by name (`data.<slot>.format`)."""

    kind: str  # the data kind it yields: "demonstrations" (an Example) or "pairs" (two)
    fields: tuple[str, ...]  # required
    optional: tuple[str, ...]  # read when present
    read: Callable[[dict[str, Any]], Any]  # record -> Example, or (chosen, rejected) Examples
    description: str  # how messages name it

    @property
    def slot_format(self) -> str:
        """ "an SFT format" or "a preference format", for messages."""
        return "an SFT format" if self.kind == "demonstrations" else "a preference format"


NAMED_FORMATS: dict[str, NamedFormat] = {}
# the formats detected from the keys; a named format may not take their names
DETECTED = ("auto", "messages", "prompt_completion", "explicit", "repeated", "implicit")


def register_format(
    name: str,
    *,
    kind: str,
    fields: tuple[str, ...],
    read: Callable[[dict[str, Any]], Any],
    description: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Make `format: NAME` read records with `read` (which raises `RecordError` naming a field)."""
    if name in DETECTED or name in FEEDBACK_FIELDS or name in NAMED_FORMATS:
        raise ValueError(f"format {name!r} is taken")
    if kind not in ("demonstrations", "pairs"):
        raise ValueError(f"a named format yields demonstrations or pairs, not {kind!r}")
    NAMED_FORMATS[name] = NamedFormat(kind, fields, optional, read, description)


def format_names() -> tuple[str, ...]:
    """What `format=` may ask for: "auto" (detected from the keys) and the named formats."""
    return ("auto", *NAMED_FORMATS)


def detect_format(record: dict[str, Any], kind: str, requested: str = "auto") -> Format:
    """The format of a dataset, from its first record's keys (and whether values are lists).

    A named `requested` format (`NAMED_FORMATS`, e.g. "alpaca") is taken without looking at the
    keys.
    """
    if requested != "auto":
        named = NAMED_FORMATS.get(requested)
        if named is None:
            raise ValueError(
                f"format must be one of {', '.join(format_names())}; got {requested!r}"
            )
        if named.kind != kind:
            raise ValueError(
                f"format {requested!r} is an {named.slot} format ({named.description})"
            )
        # other columns (even prompt/completion/messages) are unused, not errors: asked for
        return Format(kind, requested, True, named.fields, (), named.optional)
    present = _present(record)
    if kind == "demonstrations":
        if "messages" in present:
            return Format(kind, "messages", True, ("messages",), ("prompt", "completion"))
        if present & {"prompt", "completion"}:
            first = record["prompt" if "prompt" in present else "completion"]
            conversational = isinstance(first, list)
            fields = ("prompt", "completion")
            return Format(kind, "prompt_completion", conversational, fields, ("messages",))
        expected = "'prompt' and 'completion', or 'messages'"
        if {"instruction", "output"} <= present:
            expected += " (these look like Alpaca records: set format: alpaca)"
    elif kind == "pairs":
        if present & {"chosen", "rejected"}:
            if "prompt" in present:
                fields = ("prompt", "chosen", "rejected")
                conversational = isinstance(record["prompt"], list)
                response = record["chosen" if "chosen" in present else "rejected"]
                if not conversational and isinstance(response, list):
                    return Format(kind, "repeated", True, fields, ())
                return Format(kind, "explicit", conversational, fields, ())
            first = record["chosen" if "chosen" in present else "rejected"]
            conversational = isinstance(first, list)
            return Format(kind, "implicit", conversational, ("chosen", "rejected"), ("prompt",))
        expected = "'chosen' and 'rejected', with or without 'prompt'"
    elif kind == "unpaired":
        feedback = present & set(FEEDBACK_FIELDS)
        if len(feedback) == 2:
            detail = "unexpected together with 'label': a dataset holds labels or scores, not both"
            raise RecordError("score", "unexpected_field", detail)
        if feedback:
            (name,) = feedback
            first = record.get("prompt") if "prompt" in present else record.get("completion")
            conversational = isinstance(first, list)
            other = tuple(f for f in FEEDBACK_FIELDS if f != name)
            return Format(kind, name, conversational, ("prompt", "completion", name), other)
        expected = "'prompt', 'completion' and 'label' (true/false) or 'score' (a number)"
        if present & {"chosen", "rejected"}:
            expected += " (these look like preference pairs)"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    keys = ", ".join(repr(k) for k in sorted(present)) or "none"
    detail = f"cannot detect the format from keys {keys}; expected {expected}"
    raise RecordError(None, "unknown_format", detail)


def detect_pref_kind(record: dict[str, Any]) -> str:
    """What a preference-slot dataset holds, "pairs" or "unpaired", from one record's keys."""
    present = _present(record)
    pairs = present & {"chosen", "rejected"}
    feedback = present & set(FEEDBACK_FIELDS)
    if pairs and not feedback:
        return "pairs"
    if feedback and not pairs:
        return "unpaired"
    keys = ", ".join(repr(k) for k in sorted(present)) or "none"
    detail = (
        f"cannot tell preference pairs from unpaired feedback by the keys {keys}; expected "
        "'chosen' and 'rejected' (pairs), or 'completion' with 'label' (true/false) or 'score' "
        "(a number) (unpaired feedback)"
    )
    raise RecordError(None, "unknown_format", detail)


def validate_sft(record: dict[str, Any], fmt: Format) -> Example:
    _check_shape(record, fmt)
    if fmt.name == "messages":
        messages = _messages(record, "messages")
        return _chat(messages, 0, "messages", "messages")
    if fmt.name in NAMED_FORMATS:
        return NAMED_FORMATS[fmt.name].read(record)
    return _prompt_completion(record, fmt)


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    """The user message of an alpaca record: `instruction`, followed by `"\n\n" + input_text`
    when `input_text` (the record's `input`) is not None and not whitespace-only."""
    if input_text is None or not input_text.strip():
        return instruction
    return instruction + "\n\n" + input_text


def _alpaca(record: dict[str, Any]) -> ChatExample:
    instruction = _string(record, "instruction")
    if not instruction.strip():
        raise RecordError("instruction", "empty_prompt", "empty or whitespace-only instruction")
    extra = _string(record, "input") if record.get("input") is not None else None
    output = _non_empty(_string(record, "output"), "output")
    messages = [
        {"role": "user", "content": alpaca_prompt(instruction, extra)},
        {"role": "assistant", "content": output},
    ]
    return _chat(messages, 1, "instruction", "output", 1)


def chat_example(
    messages: list[dict[str, Any]], first_target: int, prompt_field: str, response_field: str
) -> ChatExample:
    """A checked `ChatExample` for a named format's `read`: assistant messages from
    `first_target` on are the targets; a problem raises `RecordError` naming the fields."""
    return _chat(messages, first_target, prompt_field, response_field)


def unused_fields(record: dict[str, Any], fmt: Format) -> list[str]:
    """The fields of `record` (value not None) that `fmt` does not read, sorted."""
    return sorted(_present(record) - set(fmt.used))


def validate_feedback(
    record: dict[str, Any], fmt: Format, score_range: tuple[float, float] | None
) -> tuple[Example, float]:
    """Check an unpaired feedback record; returns its example and target in [0, 1].

    The target is 1.0 / 0.0 for a true / false label, or the score mapped to [0, 1] from
    `score_range` (required for score data; ignored for labels).
    """
    if fmt.name == "score" and score_range is None:  # a setting, not the record's fault
        detail = (
            "score feedback needs the scores' range to map them to [0, 1]: set "
            "data.pref.score_range: [min, max]"
        )
        raise RecordError("score", "no_score_range", detail, fatal=True)
    _check_shape(record, fmt)
    if fmt.name == "label":
        target = 1.0 if _label(record) else 0.0
    else:
        lo, hi = score_range
        score = _score(record, lo, hi)
        target = (score - lo) / (hi - lo)
    return _prompt_completion(record, fmt), target


def _label(record: dict[str, Any]) -> bool:
    value = record["label"]
    if not isinstance(value, bool):
        detail = f"expected true/false, got {_type_name(value)} {_short(value)}"
        raise RecordError("label", "wrong_type", detail)
    return value


def _score(record: dict[str, Any], lo: float, hi: float) -> float:
    value = record["score"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        detail = f"expected a number, got {_type_name(value)} {_short(value)}"
        raise RecordError("score", "wrong_type", detail)
    score = float(value)
    if not math.isfinite(score):
        raise RecordError("score", "not_finite", f"expected a finite number, got {score}")
    if not lo <= score <= hi:
        detail = (
            f"{_short(value)} is outside the declared range [{lo:g}, {hi:g}] "
            "(data.pref.score_range)"
        )
        raise RecordError("score", "out_of_range", detail)
    return score


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prompt_completion(record: dict[str, Any], fmt: Format) -> Example:
    """The example of a prompt/completion record (SFT or unpaired feedback)."""
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
    if fmt.name in NAMED_FORMATS:
        return NAMED_FORMATS[fmt.name].read(record)
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
    elif fmt.name == "repeated":
        prompt_field = "chosen"
        text = _string(record, "prompt")
        n = _common_prefix_length(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            detail = "'chosen' and 'rejected' share no message, so they hold no common prompt"
            raise RecordError("chosen", "no_common_prompt", detail)
        if not any(m["role"] == "user" and m["content"].strip() == text.strip() for m in prompt):
            detail = (
                "not the content of a user message shared by 'chosen' and 'rejected' (the "
                "prompt is taken from the conversations, and must agree with this field)"
            )
            raise RecordError("prompt", "prompt_mismatch", detail)
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


register_format(
    "alpaca",
    kind="demonstrations",
    fields=("instruction", "output"),
    optional=("input",),
    read=_alpaca,
    description="alpaca (instruction, input, output)",
)
