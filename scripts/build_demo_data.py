"""Build the demo datasets in ``src/unitune/study/demo_data/`` from two installed offline corpora.

    .venv/bin/python scripts/build_demo_data.py   # rewrites src/unitune/study/demo_data/*.jsonl
    .venv/bin/python scripts/build_demo_data.py --out DIR  # writes the four files into DIR

Sources (see ``src/unitune/study/demo_data/PROVENANCE.md``): ``chatterbot-corpus``
(BSD-3-Clause, the English YAML dialogues) and ``chitchat-dataset`` (MIT, ``dataset.json``).
The output is a pure function of the installed corpora and the constants below:
same inputs, byte-identical files.

Design: every record is a short chat exchange whose assistant reply is the corpus reply, untouched
apart from whitespace/punctuation normalisation ("plain style"). SFT records teach the plain style.
Preference records use prompts from the same pool (disjoint records) with

* rejected = the plain corpus reply (exactly the SFT style), and
* chosen   = ``stylize(reply)``: the same reply in a fixed "pirate" persona — a fixed opening
  interjection ("Ahoy!") and a fixed address closing the reply (", matey!") — a style the SFT data
  never shows.

So DPO, which pushes the likelihood of the plain-style rejected replies down, necessarily pushes the
plain-style SFT targets (same prompt distribution, same reply style) down too: the two objectives
conflict by construction.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 1234
N_SFT_TRAIN = 800
N_SFT_EVAL = 64
N_PREF_TRAIN = 800
N_PREF_EVAL = 64
TWO_TURN_SHARE = 0.06  # fraction of all records that are 2-turn conversations
MAX_CHATTERBOT_SHARE = 0.30  # the rest comes from chitchat-dataset

# The preference ("chosen") style: a fixed pirate persona around the plain reply.
PERSONA_OPEN = "Ahoy!"
PERSONA_CLOSE = "matey"

# Length limits, in characters and words (SmolLM2's tokenizer: ~4.5 characters per token).
MAX_PROMPT_CHARS = 90
MAX_REPLY_CHARS = 90
MAX_PROMPT_WORDS = 18
MAX_REPLY_WORDS = 18
MAX_TURN_CHARS_2T = 48  # each message of a 2-turn conversation

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "unitune" / "study" / "demo_data"
STATS: dict[str, int] = {}  # candidate/used counts of the last build, for the provenance notes
FILES = ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl")

_PUNCT_MAP = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
    }
)
# Anything code-, markup- or platform-like is not "plain chat".
_BAD_CHARS = set("<>{}[]_*#|\\~^`@=$%&/")
_BAD_WORDS = re.compile(
    r"\b(fuck\w*|shit\w*|bitch\w*|damn\w*|crap|sex\w*|porn\w*|dick|ass|asshole|hell|bastard|"
    r"kill\w*|die|dead|death|drug\w*|drunk|gun\w*|suicide|hate|stupid|idiot|"
    r"chat|chatting|chats|score\w*|prompt\w*|rating\w*|anyone|timer|points|typing|"
    r"chatterbot|chitchat\w*|http\w*|www|com|que|veut|dire)\b",
    re.IGNORECASE,
)
_QUESTION_OPENERS = {
    "what",
    "what's",
    "whats",
    "how",
    "how's",
    "hows",
    "where",
    "who",
    "which",
    "why",
    "when",
    "do",
    "did",
    "are",
    "have",
    "would",
    "could",
    "can",
    "is",
    "if",
}
_CONTEXT_WORDS = {"it", "that", "he", "she", "him", "her", "they", "them", "those", "these", "else"}
_CONTINUATIONS = {"and", "but", "or", "also", "so", "because", "cause", "too"}
# Chatterbot files that are not chat: code blocks; a few support prompts repeated ~1000 times.
_CHATTERBOT_SKIP = {"coding.yml", "tech_support.yml"}
_CHATTERBOT_DIALOGUES = {"conversations.yml"}  # files whose items are real multi-turn dialogues


def stylize(reply: str) -> str:
    """The chosen (preferred) style: the plain reply, said by a fixed pirate persona.

    "Ahoy!" opens, ", matey" closes the reply before its final "?" or "!" (otherwise "!"):
    "Any kind of pasta" -> "Ahoy! Any kind of pasta, matey!";
    "What about you?" -> "Ahoy! What about you, matey?".
    """
    body = reply.rstrip(".!?,;: ")
    end = "?" if reply.rstrip().endswith("?") else "!"
    return f"{PERSONA_OPEN} {body}, {PERSONA_CLOSE}{end}"


def normalize_key(text: str) -> str:
    """Case/punctuation-insensitive key used for de-duplication and overlap checks."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def clean(text: object, *, max_chars: int, max_words: int) -> str | None:
    """Normalise one corpus utterance, or None when it is not a short plain ASCII sentence."""
    if not isinstance(text, str) or "\n" in text.strip():
        return None
    text = " ".join(text.translate(_PUNCT_MAP).split())
    if not text or not text.isascii() or not text.isprintable():
        return None
    if any(c in _BAD_CHARS for c in text) or _BAD_WORDS.search(text):
        return None
    if len(text) > max_chars or len(text.split()) > max_words:
        return None
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 2 or sum(c.islower() for c in letters) < 0.6 * len(letters):
        return None  # no letters, or shouting: the plain style is mixed/lower case
    if re.search(r"(.)\1{3,}", text):  # "hiiii", "!!!!!"
        return None
    if PERSONA_OPEN.lower() in text.lower() or PERSONA_CLOSE.lower() in text.lower():
        return None
    return text


def _reply(text: object) -> str | None:
    return clean(text, max_chars=MAX_REPLY_CHARS, max_words=MAX_REPLY_WORDS)


def _prompt(text: object) -> str | None:
    return clean(text, max_chars=MAX_PROMPT_CHARS, max_words=MAX_PROMPT_WORDS)


def _turn(text: object) -> str | None:
    return clean(text, max_chars=MAX_TURN_CHARS_2T, max_words=10)


def _is_standalone_question(text: str) -> bool:
    words = normalize_key(text.replace("'", "")).split()
    return (
        text.endswith("?")
        and len(words) >= 4
        and words[0] in _QUESTION_OPENERS
        and not _CONTEXT_WORDS.intersection(words)
    )


def _is_standalone_reply(text: str) -> bool:
    """A reply that does not lean on earlier turns ("and ...", "but ...")."""
    words = normalize_key(text).split()
    return bool(words) and words[0] not in _CONTINUATIONS


Conversation = tuple[tuple[str, str], ...]  # ((role, content), ...), ends with the assistant reply


def chatterbot_conversations() -> tuple[list[Conversation], list[Conversation]]:
    """(single-turn, two-turn) conversations from the English chatterbot-corpus YAML files."""
    import chatterbot_corpus
    import yaml

    base = Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"
    single: list[Conversation] = []
    double: list[Conversation] = []
    for path in sorted(base.glob("*.yml")):
        if path.name in _CHATTERBOT_SKIP:
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            user, reply = _prompt(conv[0]), _reply(conv[1])
            if user and reply:
                single.append((("user", user), ("assistant", reply)))
            if path.name in _CHATTERBOT_DIALOGUES and len(conv) >= 4:
                turns = [_turn(t) for t in conv[:4]]
                if all(turns):
                    roles = ("user", "assistant", "user", "assistant")
                    double.append(tuple(zip(roles, turns, strict=True)))  # type: ignore[arg-type]
    return single, double


def _join_utterances(utterances: list[str]) -> str:
    """One chitchat message from its utterances, each non-final one closed by punctuation."""
    parts = [" ".join(u.split()) for u in utterances]
    parts = [p for p in parts if p]
    return " ".join(
        p if p[-1] in ".!?,;:" or i == len(parts) - 1 else p + "." for i, p in enumerate(parts)
    )


def chitchat_conversations() -> tuple[list[Conversation], list[Conversation], list[Conversation]]:
    """(single-turn, single-turn with a 2-utterance reply, two-turn) from chitchat-dataset.

    Single-turn: the last utterance of a message, when it is a self-contained question (starts
    with a question word, ends with "?", 4+ words, no pronoun pointing back), and the other
    speaker's next message (at most two utterances). Two-turn: the first four messages of a
    conversation when each is a single short utterance.
    """
    import chitchat_dataset

    path = Path(chitchat_dataset.__file__).resolve().parent / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    single: list[Conversation] = []
    single_joined: list[Conversation] = []
    double: list[Conversation] = []
    for conv_id in sorted(data):
        messages = [[u["text"] for u in m] for m in data[conv_id].get("messages") or []]
        if len(messages) >= 4 and all(len(m) == 1 for m in messages[:4]):
            turns = [_turn(m[0]) for m in messages[:4]]
            if all(turns):
                roles = ("user", "assistant", "user", "assistant")
                double.append(tuple(zip(roles, turns, strict=True)))  # type: ignore[arg-type]
        for i in range(len(messages) - 1):
            if not messages[i] or not 1 <= len(messages[i + 1]) <= 2:
                continue
            user = _prompt(messages[i][-1])
            reply = _reply(_join_utterances(messages[i + 1]))
            if user and reply and _is_standalone_question(user) and _is_standalone_reply(reply):
                target = single if len(messages[i + 1]) == 1 else single_joined
                target.append((("user", user), ("assistant", reply)))
    return single, single_joined, double


def _context_key(conv: Conversation) -> str:
    return " || ".join(normalize_key(text) for _, text in conv[:-1])


def _dedupe(
    convs: list[Conversation], seen: set[str], reply_counts: Counter[str]
) -> list[Conversation]:
    """Keep the first conversation per prompt context; at most 2 uses of the same reply."""
    out = []
    for conv in convs:
        key, reply = _context_key(conv), normalize_key(conv[-1][1])
        if key in seen or reply_counts[reply] >= 2:
            continue
        seen.add(key)
        reply_counts[reply] += 1
        out.append(conv)
    return out


def select_pool(rng: random.Random) -> list[Conversation]:
    """The deduplicated, seeded selection of all records, in a random order."""
    total = N_SFT_TRAIN + N_SFT_EVAL + N_PREF_TRAIN + N_PREF_EVAL
    cb_single, cb_double = chatterbot_conversations()
    cc_single, cc_joined, cc_double = chitchat_conversations()
    seen: set[str] = set()
    replies: Counter[str] = Counter()
    # Dedupe in a seeded random order so that which duplicate survives is not file order.
    for group in (cb_single, cb_double, cc_single, cc_joined, cc_double):
        rng.shuffle(group)
    cb_single = _dedupe(cb_single, seen, replies)
    cb_double = _dedupe(cb_double, seen, replies)
    cc_double = _dedupe(cc_double, seen, replies)
    # One-utterance replies first; replies joined from two utterances only fill up.
    cc_single = _dedupe(cc_single + cc_joined, seen, replies)

    n_double = round(TWO_TURN_SHARE * total)
    doubles = (cb_double + cc_double)[:n_double]
    n_cb = min(len(cb_single), round(MAX_CHATTERBOT_SHARE * total))
    n_cc = total - len(doubles) - n_cb
    if n_cc > len(cc_single):
        raise RuntimeError(f"only {len(cc_single)} chitchat exchanges, need {n_cc}")
    pool = doubles + cb_single[:n_cb] + cc_single[:n_cc]
    STATS.update(
        chatterbot_single=len(cb_single),
        chatterbot_double=len(cb_double),
        chitchat_single=len(cc_single),
        chitchat_single_joined_used=sum(c in set(cc_joined) for c in cc_single[:n_cc]),
        chitchat_double=len(cc_double),
        used_double=len(doubles),
        used_chatterbot_single=n_cb,
        used_chitchat_single=n_cc,
    )
    rng.shuffle(pool)
    return pool


def _messages(turns: Conversation) -> list[dict[str, str]]:
    return [{"role": role, "content": text} for role, text in turns]


def sft_record(conv: Conversation) -> dict[str, object]:
    return {"messages": _messages(conv)}


def pref_record(conv: Conversation) -> dict[str, object]:
    reply = conv[-1][1]
    return {
        "prompt": _messages(conv[:-1]),
        "chosen": [{"role": "assistant", "content": stylize(reply)}],
        "rejected": [{"role": "assistant", "content": reply}],
    }


def build(out_dir: Path) -> dict[str, int]:
    """Write the four JSONL files into ``out_dir``; returns {file name: record count}."""
    rng = random.Random(SEED)
    pool = select_pool(rng)
    bounds = {
        "sft_eval.jsonl": (0, N_SFT_EVAL),
        "pref_eval.jsonl": (N_SFT_EVAL, N_SFT_EVAL + N_PREF_EVAL),
    }
    start = N_SFT_EVAL + N_PREF_EVAL
    bounds["sft_train.jsonl"] = (start, start + N_SFT_TRAIN)
    bounds["pref_train.jsonl"] = (start + N_SFT_TRAIN, start + N_SFT_TRAIN + N_PREF_TRAIN)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in FILES:
        lo, hi = bounds[name]
        make = sft_record if name.startswith("sft") else pref_record
        lines = [json.dumps(make(conv), ensure_ascii=True) + "\n" for conv in pool[lo:hi]]
        (out_dir / name).write_bytes("".join(lines).encode("ascii"))
        counts[name] = len(lines)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    counts = build(args.out)
    for name, n in counts.items():
        size = (args.out / name).stat().st_size
        print(f"{args.out / name}: {n} records, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
