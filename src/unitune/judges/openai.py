"""OpenAI-compatible chat endpoints as pairwise judges (`openai:MODEL`): OpenAI, vLLM,
llama.cpp, Ollama's OpenAI API, ... asked which of two responses is better.

The API key is read from an environment variable (`key_env`, default `OPENAI_API_KEY`) at each
request; it is kept on no object and never written to a message, a log or a file (a server's
error text is shown with the key masked).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from unitune.judges.base import (
    DEFAULT_KEY_ENV,
    JudgeError,
    JudgeKind,
    JudgeOptions,
    Prompt,
    conversation_text,
)

DEFAULT_URL = "https://api.openai.com/v1"

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


def build(argument: str, opts: JudgeOptions) -> OpenAIJudge:
    return OpenAIJudge(
        argument, base_url=opts.url or DEFAULT_URL, key_env=opts.key_env, **opts.http
    )


KIND = JudgeKind(
    "openai",
    build,
    usage="openai:MODEL",
    what="an OpenAI-compatible endpoint",
    argument="model",
    url=True,
)
