"""Write `src/unitune/eval/tasks/unitune_mc.jsonl`, the offline multiple-choice task of
`unitune eval --tasks unitune_mc` (lm-evaluation-harness, `unitune.eval.retention`).

80 simple questions with 4 choices each, from this file's own tables (written for unitune, no
outside source; Apache-2.0 like the code): arithmetic, opposites, days and months, counts,
colours and animal sounds. Distractors and the order of the choices come from a seeded RNG, so
the file reproduces byte for byte:

    .venv/bin/python scripts/build_unitune_mc.py            # rewrites the packaged file
    .venv/bin/python scripts/build_unitune_mc.py --out F    # or writes F
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240607
OUT = (
    Path(__file__).resolve().parents[1] / "src" / "unitune" / "eval" / "tasks" / "unitune_mc.jsonl"
)

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("hard", "soft"), ("win", "lose"), ("first", "last"), ("day", "night"), ("tall", "short"),
    ("rich", "poor"),
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip
COUNTS = [
    ("How many legs does a spider have?", 8),
    ("How many days are in a week?", 7),
    ("How many hours are in a day?", 24),
    ("How many months are in a year?", 12),
    ("How many minutes are in an hour?", 60),
    ("How many sides does a triangle have?", 3),
    ("How many sides does a square have?", 4),
    ("How many legs does a dog have?", 4),
    ("How many wheels does a bicycle have?", 2),
    ("How many seconds are in a minute?", 60),
    ("How many days are in a leap year?", 366),
    ("How many letters are in the word 'cat'?", 3),
]
COLOURS = [
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is fresh grass?", "green"),
    ("What colour is snow?", "white"),
    ("What colour is a ripe banana?", "yellow"),
    ("What colour is coal?", "black"),
    ("What colour is a ripe tomato?", "red"),
    ("What colour do you get by mixing red and white?", "pink"),
]
SOUNDS = [
    ("Which animal says 'moo'?", "cow"),
    ("Which animal says 'woof'?", "dog"),
    ("Which animal says 'meow'?", "cat"),
    ("Which animal says 'quack'?", "duck"),
    ("Which animal says 'baa'?", "sheep"),
    ("Which animal says 'oink'?", "pig"),
]
ANIMALS = ["cow", "dog", "cat", "duck", "sheep", "pig", "horse", "owl"]
COLOUR_WORDS = ["blue", "green", "white", "yellow", "black", "pink", "red", "orange", "purple"]


def question(rng: random.Random, text: str, answer: str, pool: list[str]) -> dict:
    """One record: the answer and three distinct distractors from `pool`, shuffled."""
    wrong = rng.sample(sorted({p for p in pool if p != answer}), 3)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"question": text, "choices": choices, "answer": choices.index(answer)}


def numbers_near(rng: random.Random, value: int) -> list[str]:
    spread = max(3, value // 4)
    near = {value + d for d in range(-spread, spread + 1) if d and value + d >= 0}
    return [str(n) for n in sorted(near)]


def build() -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    for _ in range(20):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if rng.random() < 0.5:
            text, value = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            text, value = f"What is {a} - {b}?", a - b
        rows.append(question(rng, text, str(value), [*numbers_near(rng, value), str(value)]))
    words = [w for pair in OPPOSITES for w in pair]
    for a, b in OPPOSITES:
        rows.append(question(rng, f"What is the opposite of '{a}'?", b, words))
    for i, day in enumerate(DAYS):
        rows.append(question(rng, f"Which day comes after {day}?", DAYS[(i + 1) % 7], DAYS))
    for i, month in enumerate(MONTHS):
        rows.append(
            question(rng, f"Which month comes after {month}?", MONTHS[(i + 1) % 12], MONTHS)
        )
    for text, value in COUNTS:
        rows.append(question(rng, text, str(value), [*numbers_near(rng, value), str(value)]))
    for text, colour in COLOURS:
        rows.append(question(rng, text, colour, COLOUR_WORDS))
    for text, animal in SOUNDS:
        rows.append(question(rng, text, animal, ANIMALS))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()
