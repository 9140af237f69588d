"""The judge kinds, and judge specs read by them: `demo` or another programmatic judge's name,
`rm:PATH_OR_ID` (a reward model), `openai:MODEL` (an OpenAI-compatible endpoint).

A kind is one file that defines a `JudgeKind` (its `build`, how its spec reads, whether it takes
a URL) and one line in `KINDS`. `eval.judge` in the config, `--judge` on the command line and
`make_judge` all ask this registry, and nothing else names a kind.
"""

from __future__ import annotations

from typing import Any

from unitune.judges import openai, reward_model
from unitune.judges.base import DEFAULT_KEY_ENV, Judge, JudgeError, JudgeKind, JudgeOptions
from unitune.judges.programmatic import PROGRAMMATIC, ProgrammaticJudge

KINDS: dict[str, JudgeKind] = {
    "rm": reward_model.KIND,
    "openai": openai.KIND,
}


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """`(kind, argument)` of a judge spec: `("rm", path_or_id)`, `("openai", model)`, another
    kind of `KINDS`, or `("programmatic", name)`; a ValueError saying what is expected
    otherwise."""
    kinds = ", ".join(f"{k.usage} ({k.what})" for k in KINDS.values())
    expected = f"expected {kinds} or a programmatic judge ({', '.join(sorted(PROGRAMMATIC))})"
    name, sep, arg = spec.partition(":")
    if sep:
        if name not in KINDS:
            raise ValueError(f"judge {spec!r}: unknown kind {name!r}; {expected}")
        if not arg.strip():
            raise ValueError(f"judge {spec!r}: no {KINDS[name].argument}")
        return name, arg.strip()
    if spec not in PROGRAMMATIC:
        raise ValueError(f"judge {spec!r}: unknown; {expected}")
    return "programmatic", spec


def takes_url(spec: str) -> bool:
    """Whether the judge `spec` names is reached at a URL (`judge_url`); a ValueError for a bad
    spec, as `parse_judge_spec`."""
    kind, _ = parse_judge_spec(spec)
    return kind in KINDS and KINDS[kind].url


def url_kinds() -> str:
    """The specs that take a URL, for messages: "openai:MODEL"."""
    return " or ".join(k.usage for k in KINDS.values() if k.url)


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
    if kind == "programmatic":
        return ProgrammaticJudge(arg, PROGRAMMATIC[arg])
    opts = JudgeOptions(url, key_env, trust_remote_code, device, label, http)
    return KINDS[kind].build(arg, opts)
