"""Reward specs: what each form names and how it is turned into a reward function with TRL's
signature (`base.py`). Every problem is a one-line `RewardSpecError` naming the spec, raised by
`build_rewards` before anything trains.

- `module:function` / `path/to/file.py:function`: a Python function (or any callable; a dotted
  `Class.attr` path is followed), imported as it is. A spec whose part before the first colon is
  a kind below is read as that kind, so a module named `rm`, `judge`, `format` or `length` is
  named by its file instead.
- `rm:PATH_OR_ID`: a reward model, a one-output `AutoModelForSequenceClassification` in
  safetensors (what `job: reward_model` saves), loaded by `unitune.judges.reward_model`; it reads
  the decoded prompt and completion re-tokenised with its own tokenizer and chat template, never
  the policy's token ids (TRL #1674, #3595; fixed by re-tokenising in TRL PR #2276).
- `judge:SPEC`: any pointwise judge of `unitune.judges` (`judge:demo`, `judge:rm:PATH`, a
  registered programmatic judge); a pairwise one (`judge:openai:MODEL`) only compares two
  answers and is refused. It scores the completion against the record's reference: the first
  of the columns `reference`, `answer`, `chosen` that the prompt data has, else "".
- `format:REGEX`, `length:N` and any other name of `programmatic.PROGRAMMATIC`.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitune.core.io import file_sha256
from unitune.judges.base import DEFAULT_KEY_ENV, JudgeError
from unitune.judges.registry import make_judge, parse_judge_spec
from unitune.judges.reward_model import RewardModelJudge, load_reward_model
from unitune.models.source import ModelLoadError, first_line
from unitune.rewards.base import Completion, RewardFn, RewardSpecError, completion_text
from unitune.rewards.programmatic import PROGRAMMATIC

MODEL_KINDS = {"rm": "PATH_OR_ID", "judge": "SPEC"}
REFERENCE_COLUMNS = ("reference", "answer", "chosen")
_ATTR = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class RewardSpec:
    """A parsed spec: `kind` is "rm", "judge", a programmatic name, "module" or "file";
    `argument` what follows the kind (the module or the file for Python functions);
    `function` the attribute path of a Python function ("" for the other kinds)."""

    spec: str
    kind: str
    argument: str
    function: str = ""


def expected_forms() -> str:
    """Every spec form, for messages."""
    programmatic = ", ".join(p.usage for p in PROGRAMMATIC.values())
    return f"rm:PATH_OR_ID, judge:SPEC, {programmatic}, module:function or path.py:function"


def spec_error(label: str, spec: str, problem: str) -> RewardSpecError:
    return RewardSpecError(f"{label}: reward {spec!r}: {problem}")


def parse_reward_spec(spec: str, *, label: str = "online.rewards") -> RewardSpec:
    """The kind and argument of a spec, checked without importing or loading anything (a
    programmatic reward's argument is checked: the regex compiles, N is a positive integer; a
    judge spec is read by the judges' registry)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"{label}: a reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, sep, arg = spec.partition(":")
    if not sep:
        raise spec_error(label, spec, f"no kind; expected {expected_forms()}")
    if head in MODEL_KINDS or head in PROGRAMMATIC:
        arg = arg.strip() if head in MODEL_KINDS else arg
        if not arg:
            what = MODEL_KINDS.get(head) or PROGRAMMATIC[head].usage.partition(":")[2]
            raise spec_error(label, spec, f"no {what}")
        if head == "judge":
            try:
                parse_judge_spec(arg)
            except ValueError as err:
                raise spec_error(label, spec, str(err)) from None
        elif head in PROGRAMMATIC:
            try:
                PROGRAMMATIC[head].make(arg)
            except ValueError as err:
                raise spec_error(label, spec, str(err)) from None
        return RewardSpec(spec, head, arg)
    target, _, function = spec.rpartition(":")
    if target.endswith(".py"):
        kind = "file"
    elif _ATTR.fullmatch(target):
        kind = "module"
    else:
        raise spec_error(label, spec, f"unknown kind {head!r}; expected {expected_forms()}")
    if not _ATTR.fullmatch(function):
        raise spec_error(label, spec, f"{function!r} is not a function name")
    return RewardSpec(spec, kind, target, function)


def rewards_fingerprint(specs: Sequence[str]) -> str:
    """sha256 over what the rewards read, without loading them: a local reward model's files
    (weights, config, tokenizer), a Python reward's source file; a hub id, a judge or a
    programmatic reward by its spec alone (a cache keyed on it sees a retrained reward model or
    an edited reward function)."""
    digest = hashlib.sha256()
    for spec in specs:
        parsed = parse_reward_spec(spec)
        digest.update(parsed.spec.encode() + b"\0")
        source = None
        if parsed.kind == "rm" and Path(parsed.argument).expanduser().is_dir():
            source = Path(parsed.argument).expanduser()
        elif parsed.kind == "file":
            source = Path(parsed.argument).expanduser()
        elif parsed.kind == "module":
            try:
                found = importlib.util.find_spec(parsed.argument)
            except (ImportError, ValueError):
                found = None
            source = Path(found.origin) if found is not None and found.origin else None
        files = sorted(source.iterdir()) if source and source.is_dir() else [source]
        for f in files:
            if f is not None and f.is_file():
                digest.update(f.name.encode() + b"\0")
                file_sha256(f, digest)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ Python functions
def import_file(path: Path) -> Any:
    """The module a `.py` file defines, executed afresh and registered in `sys.modules` under a
    name made from its path (dataclasses and pickling look modules up there)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"unitune_reward_{stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_function(parsed: RewardSpec, label: str) -> RewardFn:
    """The callable a `module:function` or `path.py:function` spec names."""
    spec = parsed.spec
    if parsed.kind == "file":
        path = Path(parsed.argument).expanduser()
        where = path if path.is_absolute() else Path.cwd() / path
        if not path.is_file():
            raise spec_error(label, spec, f"no such file: {where}")
        what = f"file {parsed.argument!r}"
        loader: Any = lambda: import_file(where.resolve())  # noqa: E731
    else:
        what = f"module {parsed.argument!r}"
        loader = lambda: importlib.import_module(parsed.argument)  # noqa: E731
    try:
        obj = loader()
    except Exception as err:
        raise spec_error(
            label, spec, f"cannot import {what}: {type(err).__name__}: {first_line(err)}"
        ) from None
    for part in parsed.function.split("."):
        if not hasattr(obj, part):
            raise spec_error(label, spec, f"{what} has no {parsed.function!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise spec_error(label, spec, f"{parsed.function!r} is not callable ({type(obj).__name__})")
    return obj


def call_reward(fn: RewardFn, **kwargs: Any) -> Any:
    """`fn(**kwargs)`, awaited when it is a coroutine function (TRL runs async reward
    functions too)."""
    out = fn(**kwargs)
    if inspect.isawaitable(out):

        async def wait() -> Any:
            return await out

        out = asyncio.run(wait())
    return out


# ---------------------------------------------------------------------- reward models and judges
def check_one_output(judge: RewardModelJudge, label: str, spec: str) -> None:
    """A reward is one number: a classifier with several labels (whose score the judges read
    as the last label's log-odds) is refused."""
    labels = int(getattr(judge.model.config, "num_labels", 0))
    if labels != 1:
        raise spec_error(
            label,
            spec,
            f"not a one-output reward model: its classifier has {labels} labels; a reward "
            "needs num_labels 1 (a Bradley-Terry head, what job: reward_model saves)",
        )


def load_rm(
    parsed: RewardSpec,
    label: str,
    *,
    trust_remote_code: bool,
    device: str | None,
    batch_size: int,
) -> RewardModelJudge:
    """The reward model of an `rm:` spec (safetensors only, a sequence classifier, one output)."""
    path = Path(parsed.argument).expanduser()
    if path.is_file():
        raise spec_error(label, parsed.spec, "is a file; rm: needs a reward model's directory")
    try:
        judge = load_reward_model(
            parsed.argument, trust_remote_code=trust_remote_code, device=device, label="rm:"
        )
    except ModelLoadError as err:
        # the loader's messages start "rm: 'PATH'": said here of the spec instead
        text = first_line(err).removeprefix(f"rm: {parsed.argument!r}").lstrip(": ")
        raise spec_error(label, parsed.spec, text) from None
    check_one_output(judge, label, parsed.spec)
    judge.batch_size = batch_size
    return judge


def rm_reward(judge: RewardModelJudge) -> RewardFn:
    """A reward model as a reward function: the score of each prompt + completion, as the
    `rm:` judges read it (its own chat template when it has one)."""

    def reward(
        prompts: Sequence[Any], completions: Sequence[Completion], completion_ids: Any, **_: Any
    ) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return judge.score(list(prompts), texts, [""] * len(texts))

    reward.__name__ = judge.name
    reward.judge = judge  # type: ignore[attr-defined]  # the loaded model, for the caller
    return reward


def reference_text(value: Any) -> str:
    """A reference column's value as text: a string as it is, messages (a pair's `chosen`) as
    the last one's content, None as "", anything else (a number) as `str`."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def judge_reward(judge: Any) -> RewardFn:
    """A pointwise judge as a reward function, scoring each completion against the record's
    reference (the first of `REFERENCE_COLUMNS` present, else "")."""

    def reward(
        prompts: Sequence[Any], completions: Sequence[Completion], completion_ids: Any, **cols: Any
    ) -> list[float]:
        column = next((c for c in REFERENCE_COLUMNS if c in cols), None)
        refs = [reference_text(v) for v in cols[column]] if column else [""] * len(completions)
        return judge.score(list(prompts), [completion_text(c) for c in completions], refs)

    reward.__name__ = judge.name
    reward.judge = judge  # type: ignore[attr-defined]  # the loaded model, for the caller
    return reward


def load_judge(
    parsed: RewardSpec,
    label: str,
    *,
    trust_remote_code: bool,
    device: str | None,
    batch_size: int,
    judge_url: str | None,
    judge_key_env: str = DEFAULT_KEY_ENV,
) -> Any:
    """The pointwise judge of a `judge:` spec; a pairwise judge is refused."""
    try:
        judge = make_judge(
            parsed.argument,
            url=judge_url,
            key_env=judge_key_env,
            trust_remote_code=trust_remote_code,
            device=device,
            label=f"{label}: reward {parsed.spec!r}:",
        )
    except (JudgeError, ModelLoadError) as err:
        raise RewardSpecError(first_line(err)) from None
    if getattr(judge, "kind", None) != "pointwise":
        raise spec_error(
            label,
            parsed.spec,
            "a pairwise judge compares two answers and gives no score; a reward needs a "
            "pointwise judge (demo, rm:PATH_OR_ID, a registered programmatic judge)",
        )
    if isinstance(judge, RewardModelJudge):
        check_one_output(judge, label, parsed.spec)
        judge.batch_size = batch_size
    return judge
