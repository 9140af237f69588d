"""Tests for unitune.data.prompts: the prompt data of an online preference slot.

Every accepted form, the columns kept, the prompt tokens equal to those the data layer gives the
same prompt in training data, located errors, skip counting, over-long prompts, the sources, and
`load_data`'s split for an objective on prompts.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from conftest import msg, write_jsonl

from unitune.data import DataError, PromptItem, load_preference, load_prompt_data, load_sft
from unitune.models.builtin import tiny_tokenizer

SYSTEM = msg("system", "Be brief.")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny tokenizer made to put a BOS token before every text it encodes with special
    tokens (as Llama's does): plain prompts must start with it, as plain SFT prompts do."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    bos = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
    )
    tok.bos_token = bos
    assert tok("Hi")["input_ids"][0] == tok.convert_tokens_to_ids(bos)
    return tok


def before_last_target(seq) -> list[int]:
    """The tokens of a `Sequence` before its last run of target tokens: what the model is given
    before it writes the last response."""
    mask = list(seq.target_mask)
    end = len(mask) - 1
    while end > 0 and mask[end - 1] == 1:
        end -= 1
    return list(seq.input_ids[:end])


def prompt_of(seq) -> list[int]:
    """The tokens of a `Sequence` before its first target token."""
    return list(seq.input_ids[: list(seq.target_mask).index(1)])


# ---------------------------------------------------------------- forms and tokens


@pytest.mark.parametrize("fixture", ["tok", "bos_tok"])
def test_plain_prompt_tokens_are_the_sft_prompt_tokens(request, fixture, tmp_path):
    tok = request.getfixturevalue(fixture)
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": " Spaces  around ", "id": 7}]
    items, report = load_prompt_data(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    sft, _ = load_sft(
        [{"prompt": r["prompt"], "completion": " ok"} for r in rows], tok, max_length=64
    )
    assert [it.prompt_ids for it in items] == [prompt_of(s) for s in sft]
    assert [it.prompt for it in items] == [r["prompt"] for r in rows]
    assert [it.columns for it in items] == [{"answer": "4"}, {"id": 7}]
    assert [it.where for it in items] == [f"{tmp_path / 'p.jsonl'}: line {n}" for n in (1, 2)]
    assert (report.n_records, report.n_kept, report.skipped) == (2, 2, {})
    if fixture == "bos_tok":
        assert items[0].prompt_ids[0] == tok.bos_token_id
    assert len(items[0]) == len(items[0].prompt_ids)


def test_conversational_prompt_tokens_are_the_sft_prompt_tokens(tok):
    prompts = [[SYSTEM, msg("user", "Name a fruit.")], [msg("user", "Hi {{ x }} <b>")]]
    rows = [{"prompt": p, "level": i} for i, p in enumerate(prompts)]
    items, _ = load_prompt_data(rows, tok)
    sft, _ = load_sft(
        [{"prompt": p, "completion": [msg("assistant", "A pear.")]} for p in prompts],
        tok,
        max_length=64,
    )
    assert [it.prompt_ids for it in items] == [prompt_of(s) for s in sft]
    text = tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    assert tok.decode(items[0].prompt_ids) == text
    assert text.endswith("<|im_start|>assistant\n")  # generation starts with the answer
    assert items[0].prompt == prompts[0] and items[1].columns == {"level": 1}


def test_messages_prompt_tokens_are_the_multi_turn_sft_tokens(tok):
    turns = [msg("user", "Hi."), msg("assistant", "Hello."), msg("user", "And now?")]
    items, _ = load_prompt_data([{"messages": turns, "answer": "Later."}], tok)
    sft, _ = load_sft([{"messages": [*turns, msg("assistant", "Later.")]}], tok, max_length=128)
    assert items[0].prompt_ids == before_last_target(sft[0])
    assert items[0].prompt == turns and items[0].columns == {"answer": "Later."}


@pytest.mark.parametrize(
    "pair",
    [
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},  # plain, explicit
        {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},  # plain, implicit
        {
            "prompt": [SYSTEM, msg("user", "2+2?")],
            "chosen": [msg("assistant", "4")],
            "rejected": [msg("assistant", "5")],
        },
        {
            "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
            "rejected": [msg("user", "2+2?"), msg("assistant", "5")],
        },
        {  # UltraFeedback: the prompt string repeated in the conversations
            "prompt": "2+2?",
            "chosen": [msg("user", "2+2?"), msg("assistant", "4")],
            "rejected": [msg("user", "2+2?"), msg("assistant", "5")],
        },
    ],
    ids=["plain", "plain-implicit", "chat", "chat-implicit", "repeated"],
)
def test_pairs_give_the_pairs_loaders_prompt(tok, pair):
    items, _ = load_prompt_data([{**pair, "score": 1.5}], tok)
    pairs, _ = load_preference([pair], tok, max_length=64)
    assert items[0].prompt_ids == prompt_of(pairs[0].chosen) == prompt_of(pairs[0].rejected)
    assert items[0].columns["chosen"] == pair["chosen"]
    assert items[0].columns["rejected"] == pair["rejected"]
    assert items[0].columns["score"] == 1.5
    assert "prompt" not in items[0].columns  # the prompt is the item's own
    if isinstance(pair["chosen"], list):
        assert items[0].prompt[-1] == msg("user", "2+2?")
    else:
        expected = "Q: 2+2?" if "prompt" in pair else "Q: 2+2? A:"
        assert items[0].prompt == expected


def test_sft_and_feedback_records_keep_their_answers_as_columns(tok):
    rows = [
        {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Yo")], "label": True},
    ]
    items, report = load_prompt_data(rows, tok)
    assert items[0].columns == {"completion": [msg("assistant", "Yo")], "label": True}
    assert report.unused_columns == {}  # every column goes to the rewards


def test_columns_rename_the_prompt_and_other_fields(tok, tmp_path):
    rows = [{"question": "What is 6 x 7?", "solution": "42", "source": "gsm"}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    items, _ = load_prompt_data(path, tok, columns={"prompt": "question", "answer": "solution"})
    assert items[0].prompt == "What is 6 x 7?"
    assert items[0].columns == {"answer": "42", "source": "gsm"}
    with pytest.raises(DataError) as err:
        load_prompt_data(path, tok)
    assert "math.jsonl: line 1, field 'prompt': missing (keys: 'question', 'solution'" in str(
        err.value
    )


def test_json_parquet_and_datasets_sources(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "One", "answer": "1"}, {"prompt": "Two", "answer": "2"}]
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "d"))
    for source in ("p.json", "p.parquet", "d"):
        items, _ = load_prompt_data(tmp_path / source, tok)
        assert [(it.prompt, it.columns) for it in items] == [
            ("One", {"answer": "1"}),
            ("Two", {"answer": "2"}),
        ]
        assert items[1].where == f"{tmp_path / source}: record 2"
    test, report = load_prompt_data(tmp_path / "d", tok, split="test")
    assert [it.prompt for it in test] == ["Two"] and report.n_records == 1

    pq.write_table(
        pa.Table.from_pylist([*rows, {"prompt": None, "answer": "3"}]), tmp_path / "m.parquet"
    )
    with pytest.raises(DataError, match=r"m.parquet: record 3, field 'prompt': missing"):
        load_prompt_data(tmp_path / "m.parquet", tok)


def test_num_proc_gives_what_one_process_gives(tok, tmp_path):
    rows = [{"prompt": [msg("user", f"Count to {i}.")], "n": i} for i in range(40)]
    rows[5] = {"prompt": [msg("assistant", "oops")], "n": 5}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    one = load_prompt_data(path, tok, on_bad_record="skip")
    two = load_prompt_data(path, tok, on_bad_record="skip", num_proc=2)
    assert one == two and len(one[0]) == 39 and one[1].skipped == {"not_user_last": 1}


# ---------------------------------------------------------------- located errors


def assert_located(err: DataError, file: str, line: int, field: str | None) -> None:
    text = str(err)
    assert text.startswith(f"{file}: line {line}")
    assert err.record == line and err.field == field
    if field is not None:
        assert f"field '{field}'" in text
    assert "\n" not in text


GOOD = {"prompt": "Hello", "answer": "hi"}
GOOD_CHAT = {"prompt": [msg("user", "Hello")]}
GOOD_MESSAGES = {"messages": [msg("user", "Hello")]}


@pytest.mark.parametrize(
    ("good", "bad", "field", "reason", "words"),
    [
        (GOOD, {"answer": "x"}, "prompt", "missing_field", "missing"),
        (GOOD, {"prompt": 3}, "prompt", "wrong_type", "expected a string"),
        (GOOD, {"prompt": [msg("user", "a")]}, "prompt", "wrong_type", "got a list"),
        (GOOD, {"prompt": "  \n"}, "prompt", "empty_prompt", "empty"),
        (GOOD, {"prompt": ""}, "prompt", "empty_prompt", "empty"),
        (GOOD, {"prompt": "a", "messages": []}, "messages", "unexpected_field", "unexpected"),
        (GOOD, '{"prompt": "a", ', None, "invalid_json", "invalid JSON"),
        (GOOD, b'{"prompt": "caf\xe9"}', None, "undecodable", "invalid UTF-8"),
        (GOOD, "[1, 2]", None, "wrong_type", "JSON object"),
        (GOOD_CHAT, {"prompt": "a"}, "prompt", "wrong_type", "expected a list of messages"),
        (GOOD_CHAT, {"prompt": []}, "prompt", "empty_prompt", "no messages"),
        (
            GOOD_CHAT,
            {"prompt": [msg("user", "a"), msg("assistant", "b")]},
            "prompt",
            "not_user_last",
            "prompt[1]: the prompt must end in a user turn, this is a assistant turn",
        ),
        (GOOD_CHAT, {"prompt": [msg("user", " ")]}, "prompt", "empty_prompt", "prompt[0]: empty"),
        (
            GOOD_CHAT,
            {"prompt": [msg("wizard", "a")]},
            "prompt",
            "unknown_role",
            "prompt[0]: unknown role 'wizard'",
        ),
        (GOOD_CHAT, {"prompt": [{"role": "user"}]}, "prompt", "missing_field", "no 'content'"),
        (
            GOOD_MESSAGES,
            {"messages": [msg("user", "a"), msg("assistant", "b")]},
            "messages",
            "not_user_last",
            "must end in a user turn, this is a assistant turn (to use a conversation with its "
            "answer, give the messages up to the user turn as 'prompt' and the answer as "
            "'completion'",
        ),
        (GOOD_MESSAGES, {"messages": [SYSTEM]}, "messages", "not_user_last", "a system turn"),
        (GOOD_MESSAGES, {"prompt": "a"}, "prompt", "unexpected_field", "unexpected"),
        (GOOD_MESSAGES, {"other": 1}, "messages", "missing_field", "missing"),
    ],
)
def test_bad_records_are_located(tok, tmp_path, good, bad, field, reason, words):
    # line 2 is blank: line numbers stay true to the file
    path = write_jsonl(tmp_path / "prompts.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as err:
        load_prompt_data(path, tok)
    assert_located(err.value, str(path), 4, field)
    assert err.value.reason == reason
    assert words in str(err.value)
    items, report = load_prompt_data(path, tok, on_bad_record="skip")
    assert len(items) == 3 and [it.where.rsplit(" ", 1)[1] for it in items] == ["1", "3", "5"]
    assert report.skipped == {reason: 1}
    assert (report.n_records, report.n_kept) == (4, 3)


def test_bad_pairs_are_refused_as_the_pairs_loader_refuses_them(tok, tmp_path):
    good = {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "a")]}
    good["rejected"] = [msg("assistant", "b")]
    bad = [
        ({**good, "rejected": good["chosen"]}, "chosen", "identical"),
        ({"prompt": good["prompt"], "chosen": good["chosen"]}, "rejected", "missing_field"),
        ({**good, "prompt": [msg("user", "Hi"), msg("assistant", "x")]}, "prompt", "not_user_last"),
    ]
    for record, field, reason in bad:
        path = write_jsonl(tmp_path / "pairs.jsonl", [good, record])
        with pytest.raises(DataError) as err:
            load_prompt_data(path, tok)
        assert_located(err.value, str(path), 2, field)
        assert err.value.reason == reason


def test_first_record_bad_the_form_is_the_next_ones(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 3}, {"prompt": "ok"}, {"prompt": "yes"}])
    with pytest.raises(DataError) as err:
        load_prompt_data(path, tok)
    assert_located(err.value, str(path), 1, "prompt")
    assert "expected a string or a list of messages, got int" in str(err.value)
    items, report = load_prompt_data(path, tok, on_bad_record="skip")
    assert [it.prompt for it in items] == ["ok", "yes"] and report.skipped == {"wrong_type": 1}


def test_skip_counts_each_reason(tok, tmp_path, caplog):
    rows = [
        GOOD_CHAT,
        {"prompt": []},
        {"prompt": [msg("user", "a"), msg("assistant", "b")]},
        {"prompt": [msg("wizard", "a")]},
        {"prompt": "text"},
        {"prompt": [msg("user", "a"), msg("assistant", "b")]},
        GOOD_CHAT,
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="unitune.data.prompts"):
        items, report = load_prompt_data(path, tok, on_bad_record="skip")
    assert len(items) == 2 and report.n_records == 7
    assert report.skipped == {
        "empty_prompt": 1,
        "not_user_last": 2,
        "unknown_role": 1,
        "wrong_type": 1,
    }
    assert "skipped 5" in report.summary()
    assert sum("skipped: " in r.message for r in caplog.records) == 5
    every = write_jsonl(tmp_path / "bad.jsonl", rows[1:6])
    with pytest.raises(DataError, match=r"bad.jsonl: all 5 records were skipped \(empty_prompt=1"):
        load_prompt_data(every, tok, on_bad_record="skip")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_prompt_data(write_jsonl(tmp_path / "empty.jsonl", ["", " "]), tok)


def test_no_chat_template_is_an_error_even_when_skipping(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_CHAT])
    with pytest.raises(DataError) as err:
        load_prompt_data(path, tok, on_bad_record="skip")
    assert_located(err.value, str(path), 1, "prompt")
    assert "chat template" in str(err.value)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_prompts_too_long_for_the_completion_are_skipped_and_counted(tok, tmp_path, mode, caplog):
    short = {"prompt": "Hi"}
    long = {"prompt": " ".join(["word"] * 30)}
    path = write_jsonl(tmp_path / "p.jsonl", [short, long, short, long])
    n = len(load_prompt_data([long], tok)[0][0].prompt_ids)
    with caplog.at_level(logging.WARNING, logger="unitune.data.prompts"):
        items, report = load_prompt_data(
            path, tok, max_length=n + 4, max_new_tokens=5, on_bad_record=mode
        )
    assert [it.where.rsplit(" ", 1)[1] for it in items] == ["1", "3"]
    assert report.skipped == {"too_long": 2} and report.n_kept == 2
    assert "skipped 2 (too_long=2)" in report.summary()
    logged = " ".join(r.message for r in caplog.records)
    assert f"line 2, field 'prompt': the prompt is {n} tokens" in logged
    assert f"2 prompts longer than max_length - max_new_tokens = {n - 1} tokens skipped" in logged
    # exactly at the limit: kept
    items, report = load_prompt_data(path, tok, max_length=n + 5, max_new_tokens=5)
    assert len(items) == 4 and report.skipped == {}
    with pytest.raises(DataError, match="raise data.max_length or lower online.max_new_tokens"):
        load_prompt_data([long], tok, max_length=n, max_new_tokens=1)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="on_bad_record"):
        load_prompt_data([GOOD], tok, on_bad_record="ignore")
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        load_prompt_data([GOOD], tok, max_length=64, max_new_tokens=64)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        load_prompt_data([GOOD], tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_proc"):
        load_prompt_data([GOOD], tok, num_proc=0)


# ---------------------------------------------------------------- load_data


def prompt_config(tiny_config, tmp_path, **pref):
    from unitune.config import parse_config

    rows = [{"prompt": [msg("user", f"Describe a {i}.")], "answer": str(i)} for i in range(20)]
    raw = tiny_config("sequential")
    raw["objectives"] = {"pref": {"name": "dpo"}}
    raw["data"]["max_length"] = 128
    raw["data"]["pref"] = {"train": str(write_jsonl(tmp_path / "prompts.jsonl", rows)), **pref}
    return parse_config(raw)


def load_prompts(cfg, monkeypatch):
    """`load_data(cfg)["pref"]` with the config's preference objective ("dpo") read as an
    objective on prompts, so that its prompts branch is taken whatever online objectives are
    registered (patched after the config is parsed: its checks are not under test here)."""
    from unitune.objectives import REGISTRY
    from unitune.training.batches import load_data

    with monkeypatch.context() as m:
        m.setitem(REGISTRY, "dpo", dataclasses.replace(REGISTRY["dpo"], data="prompts"))
        return load_data(cfg, tiny_tokenizer())["pref"]


def test_load_data_holds_out_prompts(tiny_config, tmp_path, monkeypatch):
    cfg = prompt_config(tiny_config, tmp_path, eval_fraction=0.25)
    split = load_prompts(cfg, monkeypatch)
    assert split.kind == "prompts" and (len(split.train), len(split.eval)) == (15, 5)
    assert all(isinstance(it, PromptItem) for it in split.train + split.eval)
    answers = sorted(it.columns["answer"] for it in split.train + split.eval)
    assert answers == sorted(str(i) for i in range(20))  # disjoint, nothing lost
    assert split.report.n_kept == 20 and split.eval_report is None
    again = load_prompts(cfg, monkeypatch)
    assert [it.where for it in again.eval] == [it.where for it in split.eval]  # seeded

    cfg = prompt_config(tiny_config, tmp_path, max_samples=4, eval_max_samples=2)
    split = load_prompts(cfg, monkeypatch)
    assert (len(split.train), len(split.eval)) == (4, 2)


def test_load_data_reads_an_eval_file_and_counts_long_prompts(tiny_config, tmp_path, monkeypatch):
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Hi"}, {"prompt": "word " * 80}])
    cfg = prompt_config(tiny_config, tmp_path, eval=str(held))
    split = load_prompts(cfg, monkeypatch)
    assert (len(split.train), len(split.eval)) == (20, 1)
    # data.max_length 128 - online.max_new_tokens (64 by default) leaves 64 tokens for a prompt
    assert split.eval_report.skipped == {"too_long": 1} and split.eval[0].prompt == "Hi"
    assert split.eval_report.source == str(held) and split.report.skipped == {}


def test_load_data_refuses_offline_preference_options(tiny_config, tmp_path, monkeypatch):
    for key, value in (("score_range", [0, 1]), ("label_threshold", 0.5), ("format", "alpaca")):
        cfg = prompt_config(tiny_config, tmp_path, **{key: value})
        with pytest.raises(DataError, match=f"prompts.jsonl: data.pref.{key}"):
            load_prompts(cfg, monkeypatch)
