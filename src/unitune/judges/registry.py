"""Judges of generated responses, and the win rate of a model's responses against references.

A judge is one of two kinds:

- **pointwise** (`score(prompts, responses, references) -> list[float]`): a reward model
  (`rm:PATH_OR_ID`, any `AutoModelForSequenceClassification`, safetensors only) or a programmatic
  judge registered by name (`register_judge`; `demo` is built in). The model's response and the
  reference are scored alike; the higher score wins, scores within `tol` tie.
- **pairwise** (`prefer(prompts, first, second) -> list[float | None]`, 1.0 when the first
  response is better, 0.0 when the second is, 0.5 for a tie, None when the verdict could not be
  read): an OpenAI-compatible chat endpoint (`openai:MODEL`). Each comparison is asked in both
  orders, model response first and reference first, and the two verdicts are averaged, so a judge
  that favours a position gains nothing from it. An unreadable verdict counts as a tie and is
  counted in `WinRate.unparsed`.

The win rate (alpaca_eval-style) is the mean over prompts of 1 (win) / 0.5 (tie) / 0 (loss), with
its standard error `std(outcomes, ddof=1) / sqrt(n)` (0 for a single prompt).

**The demo judge** (`demo`) knows what the demo data prefers: the chosen answers are the plain
reply said by a pirate persona, "Ahoy! <reply without its closing punctuation>, matey!" ("?" for a
question; `stylize` in `scripts/build_demo_data.py`). It scores a response
`(style + content) / 2` in [0, 1]: `style` is 0.5 for opening with "Ahoy! " plus 0.5 for closing
with "matey!" or "matey?" (", matey!" in the data); `content` is the token F1 (lower-cased
words, "ahoy" and "matey" left out) between the response's words and the reference's. The style
alone ("Ahoy! matey!", 0.5) loses to a styled reference, and so does the right content in the
plain style. Scored against the demo's chosen answers, which score 1, the best a model can do is
tie: its win rate is at most 0.5.

The API key of the HTTP judge is read from an environment variable (`key_env`, default
`OPENAI_API_KEY`) at each request; it is kept on no object and never written to a message, a log
or a file (a server's error text is shown with the key masked).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from unitune.models.source import (
    ModelLoadError,
    check_hub_model,
    check_local_dir,
    first_line,
    hub_problem,
    local_model_path,
)

Prompt = list[dict[str, Any]] | str

DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIE_TOL = 1e-5


class JudgeError(RuntimeError):
    """A judge could not give its verdicts (endpoint unreachable, refused, bad answer)."""


@runtime_checkable
class PointwiseJudge(Protocol):
    name: str
    kind: str  # "pointwise"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    name: str
    kind: str  # "pairwise"

    def prefer(
        self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]: ...


Judge = PointwiseJudge | PairwiseJudge


# --------------------------------------------------------------------------------------------
# The win rate


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    win_rate_se: float
    wins: int
    ties: int
    losses: int
    n: int
    judge: str
    unparsed: int = 0  # pairwise verdicts that could not be read (counted as ties)
    outcomes: tuple[float, ...] = field(default=(), repr=False)  # per prompt, in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        """The figures `eval.json` holds (no per-prompt outcomes)."""
        out = asdict(self)
        out.pop("outcomes")
        if not self.unparsed:
            out.pop("unparsed")
        return out


def win_rate(
    judge: Judge,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    references: Sequence[str],
    *,
    opponents: Sequence[str] | None = None,
    tol: float = DEFAULT_TIE_TOL,
) -> WinRate:
    """How often `responses` beat `references` under `judge` (win 1, tie 0.5, loss 0); or, given
    `opponents` (e.g. the starting model's responses), how often they beat those, the references
    still being what a pointwise judge scores both sides against.

    Pointwise judges score both sides in one call; scores within `tol` tie. Pairwise judges are
    asked with the model's response first and with the other first; the outcome of a prompt is
    the mean of the two verdicts (as the model's), so position bias cancels.
    """
    n = len(prompts)
    others = references if opponents is None else opponents
    if not n == len(responses) == len(references) == len(others):
        raise ValueError("prompts, responses and references must have the same length")
    if n == 0:
        raise ValueError("no prompts to judge")
    unparsed = 0
    if judge.kind == "pairwise":
        forward = judge.prefer(prompts, responses, others)
        backward = judge.prefer(prompts, others, responses)
        outcomes = []
        for f, b in zip(forward, backward, strict=True):
            unparsed += (f is None) + (b is None)
            first = 0.5 if f is None else f
            second = 0.5 if b is None else 1.0 - b
            outcomes.append((first + second) / 2)
    elif judge.kind == "pointwise":
        scores = judge.score([*prompts, *prompts], [*responses, *others], [*references] * 2)
        outcomes = [_compare(scores[i], scores[n + i], tol) for i in range(n)]
    else:
        raise ValueError(f"judge {judge.name!r}: unknown kind {judge.kind!r}")
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    return WinRate(
        win_rate=mean,
        win_rate_se=math.sqrt(var / n),
        wins=sum(o > 0.5 for o in outcomes),
        ties=sum(o == 0.5 for o in outcomes),
        losses=sum(o < 0.5 for o in outcomes),
        n=n,
        judge=judge.name,
        unparsed=unparsed,
        outcomes=tuple(outcomes),
    )


def _compare(model: float, reference: float, tol: float) -> float:
    if not (math.isfinite(model) and math.isfinite(reference)):
        raise JudgeError(f"a judge score is not finite ({model}, {reference})")
    if abs(model - reference) <= tol:
        return 0.5
    return 1.0 if model > reference else 0.0


# --------------------------------------------------------------------------------------------
# Judge specs: "demo", "rm:PATH_OR_ID", "openai:MODEL", a registered name

PROGRAMMATIC: dict[str, Callable[[Prompt, str, str], float]] = {}


def register_judge(name: str) -> Callable[[Callable], Callable]:
    """Register `fn(prompt, response, reference) -> float` as the pointwise judge `name`."""
    if ":" in name or not name:
        raise ValueError(f"a judge name must be non-empty without ':', got {name!r}")

    def wrap(fn: Callable[[Prompt, str, str], float]) -> Callable:
        PROGRAMMATIC[name] = fn
        return fn

    return wrap


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """`(kind, argument)` of a judge spec: `("rm", path_or_id)`, `("openai", model)` or
    `("programmatic", name)`; a ValueError saying what is expected otherwise."""
    expected = (
        "expected rm:PATH_OR_ID (a reward model), openai:MODEL (an OpenAI-compatible endpoint) "
        f"or a programmatic judge ({', '.join(sorted(PROGRAMMATIC))})"
    )
    kind, sep, arg = spec.partition(":")
    if sep:
        if kind not in ("rm", "openai"):
            raise ValueError(f"judge {spec!r}: unknown kind {kind!r}; {expected}")
        if not arg.strip():
            raise ValueError(f"judge {spec!r}: no {'model' if kind == 'openai' else 'path'}")
        return kind, arg.strip()
    if spec not in PROGRAMMATIC:
        raise ValueError(f"judge {spec!r}: unknown; {expected}")
    return "programmatic", spec


def make_judge(
    spec: str,
    *,
    url: str | None = None,
    key_env: str = DEFAULT_KEY_ENV,
    trust_remote_code: bool = False,
    device: str | None = None,
    label: str = "judge",
    **http: Any,
) -> Judge:
    """The judge a spec names, ready to use (a reward model is loaded here). `url` and `key_env`
    are the HTTP judge's; `http` passes `timeout`, `retries`, `backoff`, `workers` to it."""
    try:
        kind, arg = parse_judge_spec(spec)
    except ValueError as err:
        raise JudgeError(f"{label}: {err}") from None
    if kind == "rm":
        return load_reward_model(
            arg, trust_remote_code=trust_remote_code, device=device, label=f"{label} rm:"
        )
    if kind == "openai":
        return OpenAIJudge(arg, base_url=url or DEFAULT_URL, key_env=key_env, **http)
    return ProgrammaticJudge(arg, PROGRAMMATIC[arg])


# --------------------------------------------------------------------------------------------
# Programmatic judges


@dataclass(frozen=True)
class ProgrammaticJudge:
    name: str
    fn: Callable[[Prompt, str, str], float]
    kind: str = "pointwise"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]:
        return [
            float(self.fn(p, r, ref))
            for p, r, ref in zip(prompts, responses, references, strict=True)
        ]


DEMO_OPEN = "Ahoy! "
DEMO_CLOSE = re.compile(r"\bmatey[!?]$")
_PERSONA_WORDS = {"ahoy", "matey"}


def demo_style(response: str) -> float:
    """0.5 for opening with "Ahoy! ", 0.5 for closing with "matey!" or "matey?" (the demo data
    writes ", matey!")."""
    text = response.strip()
    return 0.5 * text.startswith(DEMO_OPEN) + 0.5 * bool(DEMO_CLOSE.search(text))


def content_words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes), the persona's words left out."""
    return [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _PERSONA_WORDS]


def token_f1(response: str, reference: str) -> float:
    """SQuAD-style F1 between the content words of two texts (1.0 when both have none)."""
    ours, theirs = content_words(response), content_words(reference)
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


@register_judge("demo")
def demo_score(prompt: Prompt, response: str, reference: str) -> float:
    """The demo's preferred style and the reference's content: `(style + F1) / 2`."""
    return (demo_style(response) + token_f1(response, reference)) / 2


# --------------------------------------------------------------------------------------------
# Reward models


class RewardModelJudge:
    """A sequence-classification reward model: the score of `prompt + response` is its logit
    (the last label's log-odds against the others when it has several labels)."""

    kind = "pointwise"

    def __init__(
        self, model: Any, tokenizer: Any, name: str, *, batch_size: int = 8, max_length: int = 2048
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    def text(self, prompt: Prompt, response: str) -> tuple[str, bool]:
        """What the reward model reads, and whether the tokenizer's special tokens are to be
        added: its own chat template over the conversation and the response when it has one,
        else the prompt and the response on separate lines."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            )
            messages.append({"role": "assistant", "content": response})
            return self.tokenizer.apply_chat_template(messages, tokenize=False), False
        return f"{conversation_text(prompt)}\n{response}", True

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], references: Sequence[str]
    ) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        tok = self.tokenizer
        out: list[float] = []
        side, tok.truncation_side, tok.padding_side = tok.truncation_side, "left", "right"
        try:
            for start in range(0, len(prompts), self.batch_size):
                rendered = [
                    self.text(p, r)
                    for p, r in zip(
                        prompts[start : start + self.batch_size],
                        responses[start : start + self.batch_size],
                        strict=True,
                    )
                ]
                rows = [
                    tok(t, add_special_tokens=special, truncation=True, max_length=self.max_length)[
                        "input_ids"
                    ]
                    for t, special in rendered
                ]
                batch = tok.pad({"input_ids": rows}, return_tensors="pt")
                with torch.inference_mode():
                    logits = self.model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                    ).logits.float()
                if logits.shape[-1] == 1:
                    values = logits[:, 0]
                else:
                    values = logits[:, -1] - torch.logsumexp(logits[:, :-1], dim=-1)
                out.extend(values.cpu().tolist())
        finally:
            tok.truncation_side = side
        return out


def load_reward_model(
    name: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    label: str = "judge rm:",
) -> RewardModelJudge:
    """A reward model from a local directory or a hub id, safetensors only, `trust_remote_code`
    off unless asked. Every failure is a one-line `ModelLoadError`; a model that is not a
    sequence classifier (a causal LM would get a random score head) is refused."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = local_model_path(name, label)
    if path is not None:
        check_local_dir(path, name, label)
        source = str(path)
    else:
        check_hub_model(name, revision, label)
        source = name
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
        archs = list(getattr(config, "architectures", None) or [])
        if not any("SequenceClassification" in a or "Reward" in a for a in archs):
            raise ModelLoadError(
                f"{label} {name!r}: not a reward model (architecture "
                f"{', '.join(archs) or 'unknown'}; expected *ForSequenceClassification)"
            )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=getattr(torch, dtype), use_safetensors=True, **common
        )
    except (OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        problem = hub_problem(err, name, revision, label) if path is None else None
        raise ModelLoadError(
            problem or f"{label} {name!r}: cannot be loaded: {first_line(err)}"
        ) from None
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return RewardModelJudge(model.to(target), tokenizer, f"rm:{name}")


def conversation_text(prompt: Prompt) -> str:
    """A prompt as plain text: a string as it is, messages as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# --------------------------------------------------------------------------------------------
# An OpenAI-compatible chat endpoint, asked which of two responses is better

JUDGE_SYSTEM = "You are a careful, impartial judge of AI assistant responses."
JUDGE_TEMPLATE = """Here is a conversation and two candidate responses to its last message.

[Conversation]
{conversation}

[Response A]
{first}

[Response B]
{second}

Which response is better: more helpful, correct and appropriate to the conversation? \
Answer with exactly one letter: A or B."""

_RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIJudge:
    """A pairwise judge behind `POST {base_url}/chat/completions` (OpenAI, vLLM, llama.cpp,
    Ollama's OpenAI API, ...). Temperature 0; timeouts, and retries with exponential backoff on
    connection failures, timeouts, 429 and 5xx answers; other HTTP errors fail at once."""

    kind = "pairwise"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_URL,
        key_env: str = DEFAULT_KEY_ENV,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        workers: int = 4,
        max_tokens: int = 16,
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise JudgeError(f"judge openai:{model}: {base_url!r} is not an http(s) URL")
        self.model = model
        self.name = f"openai:{model}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.key_env = key_env
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.workers = max(1, workers)
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.model!r}, url={self.url!r}, key_env={self.key_env!r})"

    def check(self) -> None:
        """Fail now, in one line, when the endpoint's host does not accept connections."""
        parsed = urllib.parse.urlparse(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        proxies = urllib.request.getproxies()
        if parsed.scheme in proxies and not urllib.request.proxy_bypass(parsed.hostname or ""):
            return  # requests go through a proxy: the host itself may not be reachable directly
        try:
            socket.create_connection((parsed.hostname, port), timeout=min(self.timeout, 10)).close()
        except OSError as err:
            raise JudgeError(
                f"judge {self.name}: {self.url} cannot be reached ({err.strerror or err}); "
                "check --judge-url"
            ) from None

    def prefer(
        self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]:
        contents = [
            JUDGE_TEMPLATE.format(conversation=conversation_text(p), first=a, second=b)
            for p, a, b in zip(prompts, first, second, strict=True)
        ]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            answers = list(pool.map(self.ask, contents))
        return [parse_verdict(a) for a in answers]

    def ask(self, content: str) -> str:
        """The endpoint's answer to one judging request (the text of its first choice)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": content},
                ],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                raw = self._post(body)
            except urllib.error.HTTPError as err:
                detail = self._masked(_error_text(err))
                if err.code not in _RETRYABLE:
                    raise JudgeError(self._refusal(err.code, detail)) from None
                last = f"HTTP {err.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = self._masked(f"{type(reason).__name__}: {reason}")
                continue
            return self._content(raw)
        raise JudgeError(
            f"judge {self.name}: {self.url} failed {self.retries + 1} times; last: {last}"
        )

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:
            return answer.read()

    def _content(self, raw: bytes) -> str:
        try:
            message = json.loads(raw)["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._masked(raw[:200].decode("utf-8", "replace"))
            raise JudgeError(
                f"judge {self.name}: {self.url} answered without choices[0].message: {snippet}"
            ) from None
        return content if isinstance(content, str) else ""

    def _refusal(self, code: int, detail: str) -> str:
        hint = {
            401: f"check the API key in ${self.key_env}",
            403: f"check the API key in ${self.key_env} and its access to {self.model}",
            404: "check --judge-url (it should end before /chat/completions) and the model name",
        }.get(code, "check the request")
        return f"judge {self.name}: {self.url} refused the request: HTTP {code}: {detail}; {hint}"

    def _masked(self, text: str) -> str:
        key = os.environ.get(self.key_env)
        return text.replace(key, "***") if key else text


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()[:300].decode("utf-8", "replace")
    except Exception:
        body = ""
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            body = message
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(f"{err.reason} {body}".split())[:300]


_WORD = r"(?i:better|best|preferred|winner|verdict|answer|choice)"
_VERDICTS = (
    re.compile(r"\[\[\s*(A|B)\s*\]\]"),
    re.compile(r"^(?i:response|option|answer)?\s*\(?(A|B)\)?\s*[.!]?$"),
    re.compile(
        r"\b(?:(?i:response|option)\s+)?(A|B)\s+(?i:is\s+(?:better|best|preferred|superior))"
    ),
    re.compile(
        _WORD + r"(?:\s+(?i:one|response|answer|option))?\s*(?i:is|would be|:|-)?\s*"
        r"(?:(?i:response|option)\s+)?\(?(A|B)\b"
    ),
    re.compile(r"^(A|B)\b"),
)
_TIE = re.compile(r"^\W*(?i:tie|equal|both|neither|same)\b")


def parse_verdict(text: str) -> float | None:
    """1.0 when a judge's answer picks the first response (A), 0.0 for the second (B), 0.5 for a
    tie, None when no verdict can be read. Reads "A", "B.", "[[A]]", "Response B", "**A**",
    "A is better", "The better response is B", "Answer: A", "tie"."""
    clean = re.sub(r"[*_`#\"']", "", text or "").strip()
    for pattern in _VERDICTS:
        found = pattern.search(clean)
        if found:
            return 1.0 if found.group(1) == "A" else 0.0
    if _TIE.search(clean):
        return 0.5
    return None
