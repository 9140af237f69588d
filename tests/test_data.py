"""Tests for unitune.data: formats, validation errors, truncation, sources, batching, collate."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import msg, target_spans, write_jsonl

from unitune.data import (
    DataError,
    Pair,
    Sequence,
    collate,
    data_fingerprint,
    length_batches,
    load_preference,
    load_sft,
    split_holdout,
)
from unitune.models.builtin import CHATML_TEMPLATE, tiny_tokenizer

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def check_invariants(tok, seq: Sequence) -> None:
    assert len(seq.input_ids) == len(seq.target_mask)
    assert seq.target_mask[0] == 0
    assert seq.target_mask[-1] == 1  # sequences end at their last target token
    if not seq.truncated:
        assert seq.input_ids[-1] == tok.eos_token_id


# ---------------------------------------------------------------- SFT formats


def test_plain_prompt_completion_masks(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "Q: capital of France?", "completion": " Paris"}]
    )
    seqs, report = load_sft(path, tok, max_length=64)
    (seq,) = seqs
    prompt_ids = tok("Q: capital of France?", add_special_tokens=False)["input_ids"]
    assert list(seq.input_ids[: len(prompt_ids)]) == prompt_ids
    assert set(seq.target_mask[: len(prompt_ids)]) == {0}
    assert set(seq.target_mask[len(prompt_ids) :]) == {1}
    assert target_spans(tok, seq) == [" Paris" + EOS]
    check_invariants(tok, seq)
    assert report.n_records == 1 and report.n_kept == 1 and report.truncated == 0


def test_completion_already_ending_with_eos_is_not_doubled(tok):
    (seq,), _ = load_sft([{"prompt": "Hi", "completion": " there" + EOS}], tok, max_length=64)
    assert target_spans(tok, seq) == [" there" + EOS]
    assert seq.input_ids.count(tok.eos_token_id) == 1


def test_conversational_prompt_completion(tok):
    record = {
        "prompt": [msg("system", "Be brief."), msg("user", "2+2?")],
        "completion": [msg("assistant", "4")],
    }
    (seq,), _ = load_sft([record], tok, max_length=64)
    assert target_spans(tok, seq) == ["4" + EOS]
    prompt = tok.decode([t for t, m in zip(seq.input_ids, seq.target_mask, strict=True) if not m])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    check_invariants(tok, seq)


def test_messages_every_assistant_turn_is_a_target(tok):
    record = {
        "messages": [
            msg("system", "SYS"),
            msg("user", "first question"),
            msg("assistant", "first answer"),
            msg("user", "second question"),
            msg("assistant", "second answer"),
            msg("user", "trailing question"),
        ]
    }
    (seq,), _ = load_sft([record], tok, max_length=128)
    assert target_spans(tok, seq) == ["first answer" + EOS, "second answer" + EOS]
    # the ChatML "\n" after <|im_end|> is context, not a target; the trailing user turn is dropped
    text = tok.decode(list(seq.input_ids))
    assert text.endswith("second answer" + EOS)
    assert "trailing question" not in text
    assert "first answer" + EOS + "\n<|im_start|>user\nsecond question" in text
    check_invariants(tok, seq)


def test_no_chat_template_is_an_error_even_when_skipping(tok, tmp_path):
    bare = tiny_tokenizer()
    bare.chat_template = None
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [msg("user", "a"), msg("assistant", "b")]}]
    )
    with pytest.raises(DataError, match="chat template"):
        load_sft(path, bare, max_length=64, on_bad_record="skip")


def test_template_breaking_prefix_property_is_rejected(tok, tmp_path):
    odd = tiny_tokenizer()
    odd.chat_template = "{{ messages | length }}\n" + CHATML_TEMPLATE  # header changes with length
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [msg("user", "a"), msg("assistant", "b")]}]
    )
    with pytest.raises(DataError, match="prefix property") as err:
        load_sft(path, odd, max_length=64, on_bad_record="skip")
    assert "chat.jsonl: line 1" in str(err.value)


def test_template_without_eos_closing_turns_is_rejected(tok):
    odd = tiny_tokenizer()
    odd.chat_template = CHATML_TEMPLATE.replace("'<|im_end|>'", "'<|endoftext|>'")
    with pytest.raises(DataError, match="EOS"):
        load_sft([{"messages": [msg("user", "a"), msg("assistant", "b")]}], odd, max_length=64)


# ---------------------------------------------------------------- preference formats


def test_preference_plain_explicit(tok, tmp_path):
    row = {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}
    pairs, report = load_preference(write_jsonl(tmp_path / "p.jsonl", [row]), tok, max_length=64)
    (pair,) = pairs
    assert isinstance(pair, Pair)
    assert target_spans(tok, pair.chosen) == [" 4" + EOS]
    assert target_spans(tok, pair.rejected) == [" 5" + EOS]
    n_prompt = pair.chosen.target_mask.index(1)
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]
    assert tok.decode(list(pair.chosen.input_ids[:n_prompt])) == "Q: 2+2? A:"
    check_invariants(tok, pair.chosen)
    check_invariants(tok, pair.rejected)


def test_preference_conversational_explicit(tok):
    row = {
        "prompt": [msg("user", "Say yes")],
        "chosen": [msg("assistant", "yes")],
        "rejected": [msg("assistant", "no")],
    }
    (pair,), _ = load_preference([row], tok, max_length=64)
    assert target_spans(tok, pair.chosen) == ["yes" + EOS]
    assert target_spans(tok, pair.rejected) == ["no" + EOS]
    assert tok.decode(list(pair.rejected.input_ids)).startswith("<|im_start|>user\nSay yes")


def test_preference_implicit_conversational_prompt_extraction(tok):
    shared = [
        msg("system", "S"),
        msg("user", "Pick"),
        msg("assistant", "Earlier reply"),
        msg("user", "Again"),
    ]
    row = {
        "chosen": shared + [msg("assistant", "good")],
        "rejected": shared + [msg("assistant", "bad")],
    }
    (pair,), _ = load_preference([row], tok, max_length=128)
    # the shared assistant message belongs to the prompt: only the final replies are targets
    assert target_spans(tok, pair.chosen) == ["good" + EOS]
    assert target_spans(tok, pair.rejected) == ["bad" + EOS]
    n_prompt = pair.chosen.target_mask.index(1)
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]
    assert "Earlier reply" in tok.decode(list(pair.chosen.input_ids[:n_prompt]))


def test_preference_implicit_plain_strings_cut_at_whitespace(tok):
    row = {"chosen": "The answer is four", "rejected": "The answer is five"}
    (pair,), _ = load_preference([row], tok, max_length=64)
    # common prefix "The answer is f" is cut back so no word is split
    assert target_spans(tok, pair.chosen) == [" four" + EOS]
    assert target_spans(tok, pair.rejected) == [" five" + EOS]
    assert (
        tok.decode(list(pair.chosen.input_ids[: pair.chosen.target_mask.index(1)]))
        == "The answer is"
    )


def test_preference_implicit_without_common_prompt_is_an_error(tok):
    with pytest.raises(DataError, match="share no prompt"):
        load_preference([{"chosen": "Paris", "rejected": "London"}], tok, max_length=64)


# ---------------------------------------------------------------- bad records


def assert_located(err: DataError, file: str, line: int, field: str | None) -> None:
    text = str(err)
    assert file in text
    assert f"line {line}" in text
    assert err.record == line
    assert err.field == field
    if field is not None:
        assert f"field '{field}'" in text


GOOD_SFT = {"prompt": "Hello", "completion": " world"}
GOOD_PREF = {"prompt": "Hello", "chosen": " world", "rejected": " there"}


@pytest.mark.parametrize(
    ("bad_line", "field", "reason", "words"),
    [
        ('{"prompt": "a", "completion": ', None, "invalid_json", "invalid JSON"),
        ({"prompt": "a"}, "completion", "missing_field", "missing"),
        (
            {"prompt": "a", "completion": 3},
            "completion",
            "wrong_type",
            "expected a string, got int",
        ),
        ({"prompt": "a", "completion": "   \n"}, "completion", "empty_response", "empty"),
        ({"prompt": "a", "completion": ""}, "completion", "empty_response", "empty"),
        (b'{"prompt": "a", "completion": "caf\xe9"}', None, "undecodable", "invalid UTF-8"),
        ('["not", "an", "object"]', None, "wrong_type", "JSON object"),
        (
            {"messages": [msg("user", "a"), msg("assistant", "b")]},
            "messages",
            "unexpected_field",
            "unexpected",
        ),
    ],
)
def test_sft_bad_record_errors(tok, tmp_path, bad_line, field, reason, words):
    # line 2 is blank: line numbers must stay true to the file
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, "", GOOD_SFT, bad_line, GOOD_SFT])
    with pytest.raises(DataError) as err:
        load_sft(path, tok, max_length=64)
    assert_located(err.value, "sft.jsonl", 4, field)
    assert err.value.reason == reason
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("messages", "words", "reason"),
    [
        ("hello", "expected a list of messages", "wrong_type"),
        ([{"content": "a"}, msg("assistant", "b")], "messages[0]: no 'role'", "missing_field"),
        ([{"role": "user"}, msg("assistant", "b")], "messages[0]: no 'content'", "missing_field"),
        (
            [msg("user", "a"), {"role": "assistant", "content": 5}],
            "'content' must be a string",
            "wrong_type",
        ),
        ([msg("narrator", "a"), msg("assistant", "b")], "unknown role 'narrator'", "unknown_role"),
        ([msg("user", "a"), msg("user", "b")], "no assistant message", "empty_response"),
        ([msg("user", "a"), msg("assistant", " ")], "empty assistant message", "empty_response"),
        ([msg("assistant", "b")], "must start with a system or user message", "missing_prompt"),
    ],
)
def test_messages_bad_record_errors(tok, tmp_path, messages, words, reason):
    good = {"messages": [msg("user", "hi"), msg("assistant", "hello")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError) as err:
        load_sft(path, tok, max_length=64)
    assert_located(err.value, "chat.jsonl", 2, "messages")
    assert words in str(err.value)
    assert err.value.reason == reason


def test_conversational_completion_without_assistant(tok, tmp_path):
    rows = [{"prompt": [msg("user", "a")], "completion": [msg("user", "b")]}]
    with pytest.raises(DataError) as err:
        load_sft(write_jsonl(tmp_path / "c.jsonl", rows), tok, max_length=64)
    assert_located(err.value, "c.jsonl", 1, "completion")
    assert "no assistant message" in str(err.value)


def test_chosen_identical_to_rejected(tok, tmp_path):
    same = {"prompt": "Q", "chosen": " A", "rejected": " A"}
    path = write_jsonl(tmp_path / "pref.jsonl", [GOOD_PREF] * 6 + [same])
    with pytest.raises(DataError) as err:
        load_preference(path, tok, max_length=64)
    assert_located(err.value, "pref.jsonl", 7, "chosen")
    assert str(err.value).endswith("identical to 'rejected'")


def test_pair_identical_after_truncation(tok):
    row = {"prompt": "Q", "chosen": " same start then A", "rejected": " same start then B"}
    with pytest.raises(
        DataError, match="identical to 'rejected' after tokenization and truncation"
    ):
        load_preference([row], tok, max_length=3)


def test_preference_wrong_types(tok, tmp_path):
    rows = [GOOD_PREF, {"prompt": "Q", "chosen": " A", "rejected": ["B"]}]
    with pytest.raises(DataError) as err:
        load_preference(write_jsonl(tmp_path / "pref.jsonl", rows), tok, max_length=64)
    assert_located(err.value, "pref.jsonl", 2, "rejected")
    assert "expected a string, got a list" in str(err.value)


def test_prompt_that_cannot_fit(tok, tmp_path):
    long_prompt = " ".join(["word"] * 40)
    rows = [GOOD_SFT, {"prompt": long_prompt, "completion": " ok"}]
    with pytest.raises(DataError) as err:
        load_sft(write_jsonl(tmp_path / "sft.jsonl", rows), tok, max_length=40)
    assert_located(err.value, "sft.jsonl", 2, "prompt")
    assert "cannot fit" in str(err.value)
    assert err.value.reason == "too_long"


def test_messages_that_cannot_fit(tok, tmp_path):
    rows = [{"messages": [msg("user", " ".join(["word"] * 40)), msg("assistant", "ok")]}]
    with pytest.raises(DataError) as err:
        load_sft(write_jsonl(tmp_path / "chat.jsonl", rows), tok, max_length=30)
    assert_located(err.value, "chat.jsonl", 1, "messages")
    assert "cannot fit" in str(err.value)


def test_unknown_format(tok):
    with pytest.raises(DataError, match="cannot detect the format"):
        load_sft([{"text": "just text"}], tok, max_length=64)


def test_skip_mode_counts_reasons(tok, tmp_path):
    rows = [
        GOOD_PREF,
        "{broken",
        {"prompt": "Q", "chosen": " A"},
        {"prompt": "Q", "chosen": " A", "rejected": " A"},
        {"prompt": "Q", "chosen": " A", "rejected": " B"},
        b'{"prompt": "\xff"}',
        {"prompt": "Q", "chosen": " A", "rejected": " "},
    ]
    pairs, report = load_preference(
        write_jsonl(tmp_path / "pref.jsonl", rows), tok, max_length=64, on_bad_record="skip"
    )
    assert len(pairs) == 2
    assert report.n_records == 7
    assert report.n_kept == 2
    assert report.skipped == {
        "invalid_json": 1,
        "missing_field": 1,
        "identical": 1,
        "undecodable": 1,
        "empty_response": 1,
    }
    assert "pref.jsonl" in report.source


def test_everything_skipped_is_an_error(tok, tmp_path):
    rows = ["{broken", {"prompt": "Q"}]
    with pytest.raises(DataError, match="all 2 records were skipped"):
        load_sft(
            write_jsonl(tmp_path / "sft.jsonl", rows), tok, max_length=64, on_bad_record="skip"
        )


def test_empty_file_is_an_error(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_sft(path, tok, max_length=64)


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="on_bad_record"):
        load_sft([GOOD_SFT], tok, max_length=64, on_bad_record="ignore")
    with pytest.raises(DataError, match="no such file"):
        load_sft("missing/file.jsonl", tok, max_length=64)


# ---------------------------------------------------------------- truncation


def test_truncation_cuts_the_response_only(tok):
    prompt = "Tell me a story:"
    completion = " " + " ".join(["once"] * 30)
    seqs, report = load_sft(
        [{"prompt": prompt, "completion": completion}, GOOD_SFT], tok, max_length=12
    )
    long_seq, short_seq = seqs
    n_prompt = len(tok(prompt)["input_ids"])
    assert long_seq.truncated and len(long_seq.input_ids) == 12
    assert tok.decode(list(long_seq.input_ids[:n_prompt])) == prompt
    assert sum(long_seq.target_mask) == 12 - n_prompt
    assert long_seq.input_ids[-1] != tok.eos_token_id
    assert not short_seq.truncated
    assert report.truncated == 1


def test_truncated_pair_counts_once(tok):
    long = " " + " ".join(["yes"] * 30)
    rows = [
        {"prompt": "Q:", "chosen": long, "rejected": long.replace("yes", "no")},
        {"prompt": "Q:", "chosen": long, "rejected": " no"},
        GOOD_PREF,
    ]
    pairs, report = load_preference(rows, tok, max_length=10)
    assert pairs[0].chosen.truncated and pairs[0].rejected.truncated
    assert pairs[1].chosen.truncated and not pairs[1].rejected.truncated
    assert report.truncated == 2


def test_multi_turn_truncation_keeps_earlier_turns(tok):
    record = {
        "messages": [
            msg("user", "a"),
            msg("assistant", "b"),
            msg("user", "c"),
            msg("assistant", "d " * 50),
        ]
    }
    (full,), _ = load_sft([record], tok, max_length=512)
    first_target = full.target_mask.index(1)
    first_turn_end = list(full.input_ids).index(tok.eos_token_id, first_target) + 1  # "b<|im_end|>"
    cut_inside_second_user_turn = first_turn_end + 3
    (seq,), report = load_sft([record], tok, max_length=cut_inside_second_user_turn)
    assert seq.truncated and report.truncated == 1
    assert target_spans(tok, seq) == ["b" + EOS]
    assert seq.input_ids[-1] == tok.eos_token_id  # the dangling user tokens were dropped


# ---------------------------------------------------------------- sources


ROWS = [{"prompt": "Hello", "completion": " world"}, {"prompt": "Bye", "completion": 7}]


def test_json_list_and_wrapped(tok, tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS[:1] * 3))
    seqs, report = load_sft(listed, tok, max_length=64)
    assert len(seqs) == 3 and report.n_records == 3
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS}))
    with pytest.raises(DataError) as err:
        load_sft(wrapped, tok, max_length=64)
    assert "wrapped.json: record 2, field 'completion'" in str(err.value)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a",\n')
    with pytest.raises(DataError, match="broken.json: invalid JSON at line 3"):
        load_sft(broken, tok, max_length=64)


def test_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Hello", "completion": " world"}, {"prompt": "Bye", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError) as err:
        load_sft(tmp_path / "d.parquet", tok, max_length=64)
    assert "d.parquet: record 2, field 'completion': missing" in str(err.value)
    seqs, report = load_sft(tmp_path / "d.parquet", tok, max_length=64, on_bad_record="skip")
    assert target_spans(tok, seqs[0]) == [" world" + EOS]
    assert report.skipped == {"missing_field": 1}


def test_datasets_directory(tok, tmp_path):
    import datasets

    rows = [{"messages": [msg("user", "hi"), msg("assistant", f"reply {i}")]} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    seqs, _ = load_sft(tmp_path / "ds", tok, max_length=64)
    assert [target_spans(tok, s) for s in seqs] == [[f"reply {i}" + EOS] for i in range(3)]

    pref = datasets.Dataset.from_list([GOOD_PREF, {**GOOD_PREF, "chosen": " yes"}])
    datasets.DatasetDict({"train": pref, "test": pref.select([0])}).save_to_disk(
        str(tmp_path / "dd")
    )
    pairs, report = load_preference(tmp_path / "dd", tok, max_length=64, split="test")
    assert len(pairs) == 1 and report.n_records == 1
    with pytest.raises(DataError, match="split 'validation' not found"):
        load_preference(tmp_path / "dd", tok, max_length=64, split="validation")


# ---------------------------------------------------------------- holdout and fingerprint


def test_split_holdout():
    items = list(range(20))
    train, held = split_holdout(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert split_holdout(items, 0.25, seed=3) == (train, held)
    assert split_holdout(items, 0.25, seed=4) != (train, held)
    train, held = split_holdout(items[:3], 0.01, seed=0)
    assert len(held) == 1 and len(train) == 2


def test_data_fingerprint():
    a = Sequence((1, 2, 3), (0, 1, 1))
    b = Sequence((1, 2, 3), (0, 0, 1))
    assert data_fingerprint([a, b]) == data_fingerprint([Sequence((1, 2, 3), (0, 1, 1)), b])
    assert data_fingerprint([a, b]) != data_fingerprint([b, a])
    assert data_fingerprint([a]) != data_fingerprint([b])  # masks count
    assert data_fingerprint([Pair(a, b)]) != data_fingerprint([a, b])
    # a fixed value: the key must not depend on the process (no hash(), no object ids)
    assert (
        data_fingerprint([a]) == "88a0eaaacc19ec12df27de9c8341cc8b1ed07fe529d67e1fe4d51ce138376d95"
    )


# ---------------------------------------------------------------- batching and collate


def test_length_batches_cover_each_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1037)]
    for shuffle in (True, False):
        batches = length_batches(lengths, 8, seed=1, shuffle=shuffle)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(len(b) == 8 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 8
    assert length_batches(lengths, 8, seed=1, shuffle=True) == length_batches(
        lengths, 8, seed=1, shuffle=True
    )
    assert length_batches(lengths, 8, seed=1, shuffle=True) != length_batches(
        lengths, 8, seed=2, shuffle=True
    )
    ordered = [i for b in length_batches(lengths, 8, seed=0, shuffle=False) for i in b]
    assert [lengths[i] for i in ordered] == sorted(lengths)
    assert length_batches([], 4, seed=0, shuffle=True) == []


def test_length_batches_reduce_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(2000)]

    def padding(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    grouped = length_batches(lengths, 16, seed=0, shuffle=True)
    assert padding(grouped) < 0.2 * padding(random_batches)


def test_collate_pads_right():
    a = Sequence((5, 6, 7), (0, 1, 1))
    b = Sequence((8, 9), (0, 1))
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "target_mask"}
    for t in batch.values():
        assert t.dtype == torch.long and t.shape == (2, 3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["target_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert collate([b], pad_id=99)["input_ids"].tolist() == [[8, 9]]
    assert collate([a, b], pad_id=99)["input_ids"][1, 2].item() == 99


def test_collate_real_pairs(tok):
    pairs, _ = load_preference(
        [GOOD_PREF, {**GOOD_PREF, "chosen": " a much longer answer"}], tok, max_length=64
    )
    batch = collate(
        [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=tok.pad_token_id
    )
    assert batch["input_ids"].shape[0] == 4
    assert batch["attention_mask"].sum(1).tolist() == [len(p.chosen) for p in pairs] + [
        len(p.rejected) for p in pairs
    ]
    assert (batch["target_mask"] <= batch["attention_mask"]).all()


def test_columns_map_source_fields_to_standard_ones(tmp_path):
    from unitune.data import load_sft
    from unitune.models.builtin import tiny_tokenizer

    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n')
    tok = tiny_tokenizer()
    seqs, _ = load_sft(
        path, tok, max_length=64, columns={"prompt": "instruction", "completion": "output"}
    )
    s = seqs[0]
    target = [t for t, m in zip(s.input_ids, s.target_mask, strict=True) if m]
    assert tok.decode(target) == "Hi!<|im_end|>"
    with pytest.raises(Exception, match="alpaca.jsonl"):
        load_sft(path, tok, max_length=64)


# ---------------------------------------------------------------- alpaca, UltraFeedback, unused


def prompt_text(tok, seq: Sequence) -> str:
    return tok.decode(list(seq.input_ids[: seq.target_mask.index(1)]))


def test_alpaca_format_builds_the_prompt_from_instruction_and_input(tok, tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5", "text": "dup"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "dup"},
        {"instruction": "Say bye.", "input": "  ", "output": "Bye!"},
        {"instruction": "Wave.", "output": "*waves*"},  # no input column at all
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    seqs, report = load_sft(path, tok, max_length=128, format="alpaca")
    user = ["Add the numbers.\n\n2, 3", "Say hi.", "Say bye.", "Wave."]
    for seq, content, row in zip(seqs, user, rows, strict=True):
        assert prompt_text(tok, seq) == f"<|im_start|>user\n{content}{EOS}\n<|im_start|>assistant\n"
        assert target_spans(tok, seq) == [row["output"] + EOS]
        check_invariants(tok, seq)
    # exactly the tokens of the same conversation given as prompt/completion messages
    chat = [
        {"prompt": [msg("user", content)], "completion": [msg("assistant", row["output"])]}
        for content, row in zip(user, rows, strict=True)
    ]
    assert seqs == load_sft(chat, tok, max_length=128)[0]
    assert report.unused_columns == {"text": 2}  # counted, not silently dropped
    assert "unused columns: text (2)" in report.summary()


def test_alpaca_format_errors_name_the_field(tok, tmp_path):
    rows = [{"instruction": "Hi.", "output": "Hello."}, {"instruction": "  ", "output": "x"}]
    with pytest.raises(DataError, match="line 2, field 'instruction'.*empty"):
        load_sft(write_jsonl(tmp_path / "a.jsonl", rows), tok, max_length=64, format="alpaca")
    rows = [{"instruction": "Hi.", "input": ["a list"], "output": "Hello."}]
    with pytest.raises(DataError, match="line 1, field 'input'.*expected a string"):
        load_sft(write_jsonl(tmp_path / "b.jsonl", rows), tok, max_length=64, format="alpaca")


def test_alpaca_records_without_the_format_say_how_to_read_them(tok):
    with pytest.raises(DataError, match="set format: alpaca"):
        load_sft([{"instruction": "Hi.", "input": "", "output": "Hello."}], tok, max_length=64)


def test_alpaca_format_from_the_config(tiny_config, tmp_path):
    from unitune.config import parse_config
    from unitune.training.batches import load_data

    rows = [{"instruction": f"Name animal {i}.", "input": a, "output": a} for i, a in
            enumerate(["cat", "dog", "owl", "fox"])]  # fmt: skip
    raw = tiny_config("sft")
    raw["data"] = {"sft": {"train": str(write_jsonl(tmp_path / "al.jsonl", rows)),
                           "format": "alpaca"}, "max_length": 64}  # fmt: skip
    split = load_data(parse_config(raw), tiny_tokenizer())["sft"]
    assert len(split.train) + len(split.eval) == 4
    seq = (split.train + split.eval)[0]
    assert "Name animal" in prompt_text(tiny_tokenizer(), seq)


def ultrafeedback_rows() -> list[dict]:
    """Records shaped exactly as HuggingFaceH4/ultrafeedback_binarized publishes them."""
    out = []
    for i, (q, good, bad) in enumerate(
        [("What is 2+2?", "It is 4.", "It is 5."), ("Name a color.", "Blue.", "Seven.")]
    ):
        chosen = [msg("user", q), msg("assistant", good)]
        out.append(
            {
                "prompt": q,
                "prompt_id": f"id{i}",
                "chosen": chosen,
                "rejected": [msg("user", q), msg("assistant", bad)],
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return out


def test_ultrafeedback_prompt_is_extracted_from_the_conversations(tok, tmp_path):
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", ultrafeedback_rows())
    pairs, report = load_preference(path, tok, max_length=128)
    first = pairs[0]
    expected = f"<|im_start|>user\nWhat is 2+2?{EOS}\n<|im_start|>assistant\n"
    assert prompt_text(tok, first.chosen) == prompt_text(tok, first.rejected) == expected
    assert target_spans(tok, first.chosen) == ["It is 4." + EOS]
    assert target_spans(tok, first.rejected) == ["It is 5." + EOS]
    # as TRL's maybe_extract_prompt: the same pairs as the explicit conversational form
    explicit = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
        for r in ultrafeedback_rows()
    ]
    assert pairs == load_preference(explicit, tok, max_length=128)[0]
    unused = {"prompt_id": 2, "messages": 2, "score_chosen": 2, "score_rejected": 2}
    assert report.unused_columns == unused


def test_string_prompt_must_match_the_conversations(tok):
    row = ultrafeedback_rows()[0] | {"prompt": "Something else entirely?"}
    with pytest.raises(DataError, match="record 1, field 'prompt'.*not the content of a user"):
        load_preference([row], tok, max_length=128)


def test_ultrafeedback_trains(tiny_config, tmp_path):
    from unitune.config import parse_config
    from unitune.jobs import train

    rows = ultrafeedback_rows() * 4
    raw = tiny_config("pref", max_steps=2, eval_every=2)
    raw["data"]["sft"] = None
    raw["data"]["pref"] = {"train": str(write_jsonl(tmp_path / "uf.jsonl", rows))}
    summary = train(parse_config(raw), progress=False)
    assert summary["steps"]["pref"] == 2
    assert summary["final"]["f_pref"] > 0
    # the columns the format leaves unused are counted in the run's summary, per split
    report = summary["data"]["pref"]["train_report"]
    assert report["unused_columns"] == {
        c: report["kept"] for c in ("messages", "prompt_id", "score_chosen", "score_rejected")
    }
