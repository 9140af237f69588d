"""Reward-model judges (`rm:PATH_OR_ID`): any `AutoModelForSequenceClassification`, safetensors
only, pointwise: the score of `prompt + response` is its logit.

What the reward model reads is what it was trained on. A reward model `job: reward_model` saved
says so in its config (`READS_KEY`): it trained on unitune's data loader's tokens of each pair
(a conversation through the chat template up to the answer's end-of-turn token, nothing after
it; a plain prompt + answer + EOS), so it reads the same tokens here. Any other reward model
reads as TRL trains and scores one: the whole chat template over the conversation and the
answer (a plain prompt as a user turn when the tokenizer has a template), else the prompt and
the answer on separate lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unitune.data.errors import RecordError
from unitune.data.tokenize import Encoder, assemble, plan_example
from unitune.data.validation import ChatExample, TextExample
from unitune.judges.base import JudgeKind, JudgeOptions, Prompt, conversation_text
from unitune.models.source import (
    ModelLoadError,
    check_hub_model,
    check_local_dir,
    first_line,
    hub_problem,
    local_model_path,
)

# the config key and value of a reward model `job: reward_model` saved: it reads data-loader tokens
READS_KEY, READS_DATA = "unitune_reads", "data_loader_tokens"


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
        self._encoder: Encoder | None = None

    def ids(self, prompt: Prompt, response: str) -> list[int]:
        """The token ids the reward model reads for one answer (the module docstring)."""
        if getattr(self.model.config, READS_KEY, None) == READS_DATA:
            try:
                return self.data_ids(prompt, response)
            except RecordError:  # a prompt over max_length: read as text, cut from the left
                pass
        text, special = self.text(prompt, response)
        return self.tokenizer(
            text, add_special_tokens=special, truncation=True, max_length=self.max_length
        )["input_ids"]

    def data_ids(self, prompt: Prompt, response: str) -> list[int]:
        """The data loader's tokens of `prompt` + `response` (`data/tokenize.py`): what
        `job: reward_model` trains on."""
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer)
        if isinstance(prompt, str):
            example = TextExample(prompt, response, "prompt", "completion")
        else:
            messages = [*prompt, {"role": "assistant", "content": response}]
            example = ChatExample(messages, len(prompt), "prompt", "completion")
        plan = plan_example(example, self._encoder)
        encoded = self._encoder.encode_many([text for text, _ in plan.pieces])
        return list(assemble(plan, encoded, self._encoder, self.max_length).input_ids)

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
                rows = [
                    self.ids(p, r)
                    for p, r in zip(
                        prompts[start : start + self.batch_size],
                        responses[start : start + self.batch_size],
                        strict=True,
                    )
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


def build(argument: str, opts: JudgeOptions) -> RewardModelJudge:
    return load_reward_model(
        argument,
        trust_remote_code=opts.trust_remote_code,
        device=opts.device,
        label=f"{opts.label} rm:",
    )


KIND = JudgeKind("rm", build, usage="rm:PATH_OR_ID", what="a reward model", argument="path")
