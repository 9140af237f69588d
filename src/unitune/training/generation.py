"""Generation during training (`eval.generate`): the held-out prompts, the judge and the starting
model's responses, set up before training; the win rate of the current model at each evaluation.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

from unitune.core.io import atomic_write
from unitune.eval.evaluate import generation_eval, judge_for, run_prompts
from unitune.eval.generate import EvalPrompt, generate
from unitune.models.lora import reference_mode
from unitune.training.session import Session


class Generation:
    """`eval.generate`'s fixed inputs: the held-out prompts with their references and the judge
    (a bad prompt or judge spec stops the run now, not at its first evaluation), and
    (`eval.win_rate_against: base`) the starting model's responses, generated or cached."""

    def __init__(self, session: Session):
        self.session = session
        ev = session.cfg.eval
        self.prompts: list[EvalPrompt] = run_prompts(session.cfg, max_samples=ev.generate_samples)
        self.judge = judge_for(ev)
        self.base = self._base_responses() if ev.win_rate_against == "base" else None

    def _base_responses(self) -> list[str]:
        """The starting model's greedy responses to the prompts, cached under the cache dir by
        the starting weights, the precision, the prompts and the generation settings: the runs
        of a sweep or of the demo generate them once."""
        s = self.session
        ev, bs = s.cfg.eval, s.cfg.train.eval_batch_size
        texts = [p.prompt for p in self.prompts]
        key = hashlib.sha256(
            json.dumps(
                [s.fingerprint(s.logps, adapters=False), s.acc.mixed_precision, texts,
                 ev.max_new_tokens, bs],
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]  # fmt: skip
        path = s.cache_dir / "generations" / f"{key}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if isinstance(cached, list) and len(cached) == len(texts):
                s.console.log("eval.generate: the starting model's responses: cache hit")
                return cached
        s.console.log(f"eval.generate: the starting model's responses ({len(texts)})")
        with reference_mode(s.model), s.acc.autocast():
            base = generate(
                s.model, s.tokenizer, texts, max_new_tokens=ev.max_new_tokens, batch_size=bs
            )
        if s.main:
            atomic_write(path, json.dumps(base))
        return base

    def win_rate(self, model: nn.Module, step: int | None, at_start: bool) -> dict[str, float]:
        """Greedy responses of `model` to the held-out prompts, judged against their references
        or the starting model's responses (`eval.win_rate_against`) as `win_rate`,
        `win_rate_se`, in the training precision; the main process writes them to
        `generations/step-N.jsonl`. Every process generates the same (greedy, the same weights),
        so each logs the same figures. At the start, the starting model's responses are reused.
        A judge that fails raises `JudgeError`."""
        s, ev = self.session, self.session.cfg.eval
        path = None
        if s.main and step is not None:
            path = s.out / "generations" / f"step-{step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
        with s.acc.autocast():
            return generation_eval(
                model,
                s.tokenizer,
                [p.prompt for p in self.prompts],
                [p.reference for p in self.prompts],
                self.judge,
                max_new_tokens=ev.max_new_tokens,
                batch_size=s.cfg.train.eval_batch_size,
                out_path=path,
                opponents=self.base,
                responses=self.base if at_start else None,
            )
