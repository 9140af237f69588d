"""The reward function both frameworks train on in benchmarks/online_vs_trl.py, with TRL's
signature: a pirate's greeting and a short answer (the demo data's chosen answers start with
"Ahoy"). Cheap, so the benchmark times the trainers, not the reward."""

from __future__ import annotations


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def pirate(prompts, completions, **kwargs) -> list[float]:
    out = []
    for c in completions:
        text = _text(c).strip()
        words = len(text.split())
        out.append(float(text.lower().startswith("ahoy")) + 0.5 * float(0 < words <= 20))
    return out
