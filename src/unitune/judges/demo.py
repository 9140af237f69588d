"""The demo's judge (`demo`): it knows what the demo data prefers.

The chosen answers are the plain reply said by a pirate persona, "Ahoy! <reply without its
closing punctuation>, matey!" ("?" for a question; `stylize` in `scripts/build_demo_data.py`). It
scores a response `(style + content) / 2` in [0, 1]: `style` is 0.5 for opening with "Ahoy! "
plus 0.5 for closing with "matey!" or "matey?" (", matey!" in the data); `content` is the token
F1 (lower-cased words, "ahoy" and "matey" left out) between the response's words and the
reference's. The style alone ("Ahoy! matey!", 0.5) loses to a styled reference, and so does the
right content in the plain style. Scored against the demo's chosen answers, which score 1, the
best a model can do is tie: its win rate is at most 0.5.
"""

from __future__ import annotations

import re
from collections import Counter

from unitune.judges.base import Prompt

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


def demo_score(prompt: Prompt, response: str, reference: str) -> float:
    """The demo's preferred style and the reference's content: `(style + F1) / 2`."""
    return (demo_style(response) + token_f1(response, reference)) / 2
