"""Tests for unpaired feedback data: label and score formats, errors, mismatched pairs, kinds."""

from __future__ import annotations

import json
import math

import pytest
from conftest import msg, target_spans, write_jsonl

from unitune.data import (
    DataError,
    Feedback,
    Sequence,
    data_fingerprint,
    detect_kind,
    feedback_kind,
    load_feedback,
    load_sft,
    mismatched,
)
from unitune.models.builtin import tiny_tokenizer

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def prompt_text(tok, item: Feedback) -> str:
    return tok.decode(list(item.seq.input_ids[: item.prompt_len]))


def check_item(tok, item: Feedback) -> None:
    seq = item.seq
    assert len(seq.input_ids) == len(seq.target_mask)
    assert seq.target_mask[0] == 0 and seq.target_mask[-1] == 1
    assert set(seq.target_mask[: item.prompt_len]) == {0}
    assert seq.target_mask[item.prompt_len] == 1
    if not seq.truncated:
        assert seq.input_ids[-1] == tok.eos_token_id


def assert_located(err: DataError, file: str, line: int, field: str | None) -> None:
    text = str(err)
    assert file in text
    assert f"line {line}" in text
    assert err.record == line
    assert err.field == field
    if field is not None:
        assert f"field '{field}'" in text


GOOD_LABEL = {"prompt": "Hello", "completion": " world", "label": True}
GOOD_SCORE = {"prompt": "Hello", "completion": " world", "score": 3}
FEEDBACK_FINGERPRINT = "3ba87b385940e0b4895098f46e5cea58a9010e7407acb9e8be10a71c4e7a6b31"


# ---------------------------------------------------------------- formats


def test_plain_labels(tok, tmp_path):
    rows = [
        {"prompt": "Q: capital of France?", "completion": " Paris", "label": True},
        {"prompt": "Q: capital of France?", "completion": " Rome", "label": False},
    ]
    items, report = load_feedback(write_jsonl(tmp_path / "kto.jsonl", rows), tok, max_length=64)
    good, bad = items
    assert (good.target, bad.target) == (1.0, 0.0)
    assert feedback_kind(items) == "label"
    assert target_spans(tok, good.seq) == [" Paris" + EOS]
    assert target_spans(tok, bad.seq) == [" Rome" + EOS]
    prompt_ids = tok("Q: capital of France?", add_special_tokens=False)["input_ids"]
    assert good.prompt_len == len(prompt_ids)
    assert list(good.seq.input_ids[: good.prompt_len]) == prompt_ids
    for item in items:
        check_item(tok, item)
    assert report.n_records == 2 and report.n_kept == 2 and report.truncated == 0
    assert report.skipped == {}


def test_same_tokenization_as_sft(tok):
    rows = [
        {"prompt": "Q: 2+2? A:", "completion": " 4", "label": True},
        {"prompt": [msg("user", "2+2?")], "completion": [msg("assistant", "4")], "label": True},
    ]
    for row in rows:
        (item,), _ = load_feedback([row], tok, max_length=64)
        sft_row = {"prompt": row["prompt"], "completion": row["completion"]}
        (seq,), _ = load_sft([sft_row], tok, max_length=64)
        assert item.seq == seq


def test_conversational_labels(tok):
    row = {
        "prompt": [msg("system", "Be brief."), msg("user", "2+2?")],
        "completion": [msg("assistant", "4")],
        "label": False,
    }
    (item,), _ = load_feedback([row], tok, max_length=64)
    assert item.target == 0.0 and item.kind == "label"
    assert target_spans(tok, item.seq) == ["4" + EOS]
    assert prompt_text(tok, item) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    check_item(tok, item)


def test_scores_are_mapped_to_unit_interval(tok, tmp_path):
    rows = [{**GOOD_SCORE, "score": s} for s in (-1, 0.5, 4, 3.25)]
    items, _ = load_feedback(
        write_jsonl(tmp_path / "s.jsonl", rows), tok, max_length=64, score_range=(-1, 4)
    )
    assert [i.target for i in items] == [0.0, 0.3, 1.0, 0.85]
    assert feedback_kind(items) == "score"
    assert all(i.kind == "score" for i in items)
    for item in items:
        assert target_spans(tok, item.seq) == [" world" + EOS]
        check_item(tok, item)


def test_conversational_scores(tok):
    row = {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Hey")], "score": 7.5}
    (item,), _ = load_feedback([row], tok, max_length=64, score_range=[0, 10])
    assert item.target == 0.75 and item.kind == "score"
    assert target_spans(tok, item.seq) == ["Hey" + EOS]
    assert prompt_text(tok, item) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_label_data_ignores_score_range(tok):
    (item,), _ = load_feedback([GOOD_LABEL], tok, max_length=64, score_range=(0, 5))
    assert item.target == 1.0 and item.kind == "label"


def test_parquet_labels(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD_LABEL, {**GOOD_LABEL, "label": None}, {**GOOD_LABEL, "label": False}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError) as err:
        load_feedback(tmp_path / "d.parquet", tok, max_length=64)
    assert "d.parquet: record 2, field 'label': missing" in str(err.value)
    items, report = load_feedback(tmp_path / "d.parquet", tok, max_length=64, on_bad_record="skip")
    assert [i.target for i in items] == [1.0, 0.0]
    assert report.skipped == {"missing_field": 1}


def test_columns(tok):
    row = {"question": "Hello", "answer": " world", "thumbs_up": True}
    columns = {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    (item,), _ = load_feedback([row], tok, max_length=64, columns=columns)
    assert item.target == 1.0
    assert detect_kind([row], columns=columns) == "unpaired"


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    ("bad_line", "field", "reason", "words"),
    [
        ({**GOOD_LABEL, "label": 1}, "label", "wrong_type", "expected true/false, got int 1"),
        ({**GOOD_LABEL, "label": 0}, "label", "wrong_type", "expected true/false, got int 0"),
        ({**GOOD_LABEL, "label": "true"}, "label", "wrong_type", 'got a string "true"'),
        ({**GOOD_LABEL, "label": 1.0}, "label", "wrong_type", "expected true/false"),
        ({"prompt": "a", "completion": " b"}, "label", "missing_field", "missing"),
        ({**GOOD_LABEL, "label": None}, "label", "missing_field", "missing"),
        ({**GOOD_LABEL, "score": 2}, "score", "unexpected_field", "unexpected"),
        ({**GOOD_LABEL, "completion": " "}, "completion", "empty_response", "empty"),
        ({**GOOD_LABEL, "completion": ""}, "completion", "empty_response", "empty"),
        ({**GOOD_LABEL, "completion": 3}, "completion", "wrong_type", "expected a string"),
        ({**GOOD_LABEL, "prompt": [msg("user", "a")]}, "prompt", "wrong_type", "got a list"),
        ({"completion": " b", "label": True}, "prompt", "missing_field", "missing"),
        ('{"prompt": "a", "completion": ', None, "invalid_json", "invalid JSON"),
        (b'{"prompt": "a", "completion": "caf\xe9", "label": true}', None, "undecodable", "UTF-8"),
        ("[1, 2]", None, "wrong_type", "JSON object"),
        (
            {"prompt": " ".join(["word"] * 40), "completion": " ok", "label": True},
            "prompt",
            "too_long",
            "cannot fit",
        ),
    ],
)
def test_label_bad_record_errors(tok, tmp_path, bad_line, field, reason, words):
    # line 2 is blank: line numbers must stay true to the file
    path = write_jsonl(tmp_path / "kto.jsonl", [GOOD_LABEL, "", GOOD_LABEL, bad_line, GOOD_LABEL])
    with pytest.raises(DataError) as err:
        load_feedback(path, tok, max_length=40)
    assert_located(err.value, "kto.jsonl", 4, field)
    assert err.value.reason == reason
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("bad_line", "field", "reason", "words"),
    [
        ({**GOOD_SCORE, "score": "3"}, "score", "wrong_type", "expected a number, got a string"),
        ({**GOOD_SCORE, "score": True}, "score", "wrong_type", "expected a number, got bool"),
        ({**GOOD_SCORE, "score": [3]}, "score", "wrong_type", "expected a number, got a list"),
        ({**GOOD_SCORE, "score": 5.5}, "score", "out_of_range", "outside the declared range"),
        ({**GOOD_SCORE, "score": -1}, "score", "out_of_range", "range [0, 5]"),
        ('{"prompt": "a", "completion": " b", "score": NaN}', "score", "not_finite", "nan"),
        ('{"prompt": "a", "completion": " b", "score": Infinity}', "score", "not_finite", "inf"),
        (
            '{"prompt": "a", "completion": " b", "score": -Infinity}',
            "score",
            "not_finite",
            "finite",
        ),
        ({"prompt": "a", "completion": " b"}, "score", "missing_field", "missing"),
        ({**GOOD_SCORE, "label": True}, "label", "unexpected_field", "unexpected"),
        ({**GOOD_SCORE, "completion": "\n"}, "completion", "empty_response", "empty"),
        ({**GOOD_SCORE, "prompt": 5}, "prompt", "wrong_type", "expected a string, got int"),
    ],
)
def test_score_bad_record_errors(tok, tmp_path, bad_line, field, reason, words):
    path = write_jsonl(tmp_path / "s.jsonl", [GOOD_SCORE, "", GOOD_SCORE, bad_line])
    with pytest.raises(DataError) as err:
        load_feedback(path, tok, max_length=64, score_range=(0, 5))
    assert_located(err.value, "s.jsonl", 4, field)
    assert err.value.reason == reason
    assert words in str(err.value)


def test_conversational_bad_records(tok, tmp_path):
    good = {"prompt": [msg("user", "a")], "completion": [msg("assistant", "b")], "label": True}
    cases = [
        ({**good, "completion": [msg("user", "b")]}, "completion", "no assistant message"),
        ({**good, "completion": [msg("assistant", " ")]}, "completion", "empty assistant"),
        ({**good, "completion": "b"}, "completion", "expected a list of messages"),
        ({**good, "prompt": [msg("narrator", "a")]}, "prompt", "unknown role 'narrator'"),
        ({**good, "prompt": []}, "prompt", "must start with a system or user message"),
    ]
    for row, field, words in cases:
        path = write_jsonl(tmp_path / "c.jsonl", [good, row])
        with pytest.raises(DataError) as err:
            load_feedback(path, tok, max_length=64)
        assert_located(err.value, "c.jsonl", 2, field)
        assert words in str(err.value)


def test_first_record_decides_the_format(tok, tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{**GOOD_LABEL, "score": 1}])
    with pytest.raises(DataError) as err:
        load_feedback(path, tok, max_length=64, score_range=(0, 1))
    assert_located(err.value, "both.jsonl", 1, "score")
    assert "labels or scores, not both" in str(err.value)

    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(DataError) as err:
        load_feedback(path, tok, max_length=64)
    assert_located(err.value, "sft.jsonl", 1, None)
    assert "'label' (true/false) or 'score' (a number)" in str(err.value)

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    with pytest.raises(DataError, match="look like preference pairs"):
        load_feedback(path, tok, max_length=64)


def test_score_data_needs_a_range_even_when_skipping(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ["{broken", {**GOOD_SCORE, "completion": ""}])
    with pytest.raises(DataError) as err:
        load_feedback(path, tok, max_length=64, on_bad_record="skip")
    assert_located(err.value, "s.jsonl", 2, "score")
    assert "set data.pref.score_range: [min, max]" in str(err.value)


@pytest.mark.parametrize(
    "bad", [(5, 5), (5, 1), (0, math.nan), (0, math.inf), (0,), "0-5", (False, True)]
)
def test_bad_score_range(tok, bad):
    with pytest.raises(ValueError, match=r"score_range.*min < max"):
        load_feedback([GOOD_SCORE], tok, max_length=64, score_range=bad)


def test_skip_mode_counts_reasons(tok, tmp_path):
    rows = [
        GOOD_LABEL,
        "{broken",
        {**GOOD_LABEL, "label": 1},
        {**GOOD_LABEL, "label": "false"},
        {"prompt": "a", "completion": " b"},
        {**GOOD_LABEL, "label": False},
        b'{"prompt": "\xff"}',
        {**GOOD_LABEL, "completion": " "},
        {**GOOD_LABEL, "score": 1.0},
    ]
    items, report = load_feedback(
        write_jsonl(tmp_path / "kto.jsonl", rows), tok, max_length=64, on_bad_record="skip"
    )
    assert [i.target for i in items] == [1.0, 0.0]
    assert report.n_records == 9 and report.n_kept == 2
    assert report.skipped == {
        "invalid_json": 1,
        "wrong_type": 2,
        "missing_field": 1,
        "undecodable": 1,
        "empty_response": 1,
        "unexpected_field": 1,
    }

    nan = '{"prompt": "a", "completion": " b", "score": NaN}'
    rows = [GOOD_SCORE, {**GOOD_SCORE, "score": 9}, nan, {**GOOD_SCORE, "score": "2"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    items, report = load_feedback(
        path, tok, max_length=64, on_bad_record="skip", score_range=(0, 5)
    )
    assert [i.target for i in items] == [0.6]
    assert report.skipped == {"out_of_range": 1, "not_finite": 1, "wrong_type": 1}


def test_truncation_is_counted(tok):
    long = " " + " ".join(["once"] * 30)
    rows = [
        {"prompt": "Tell me a story:", "completion": long, "label": True},
        GOOD_LABEL,
        {"prompt": "Q:", "completion": long, "label": False},
    ]
    items, report = load_feedback(rows, tok, max_length=12)
    assert report.truncated == 2
    assert [i.seq.truncated for i in items] == [True, False, True]
    first = items[0]
    assert len(first.seq) == 12 and first.seq.input_ids[-1] != tok.eos_token_id
    assert prompt_text(tok, first) == "Tell me a story:"
    assert sum(first.seq.target_mask) == 12 - first.prompt_len


# ---------------------------------------------------------------- mismatched (KL) pairs


def completion_part(item: Feedback) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return item.seq.input_ids[item.prompt_len :], item.seq.target_mask[item.prompt_len :]


def test_mismatched_pairs_prompt_i_with_completion_i_plus_1(tok):
    rows = [
        {"prompt": "Q: one?", "completion": " A one", "label": True},
        {"prompt": "Q: number two?", "completion": " A two two", "label": False},
        {"prompt": "Q: three?", "completion": " A three", "label": True},
    ]
    items, _ = load_feedback(rows, tok, max_length=64)
    batch = [2, 0, 1]
    out = mismatched(items, batch)
    assert len(out) == 3
    for i, seq in enumerate(out):
        p, c = items[batch[i]], items[batch[(i + 1) % 3]]
        ids, mask = completion_part(c)
        assert seq.input_ids == p.seq.input_ids[: p.prompt_len] + ids
        assert seq.target_mask == (0,) * p.prompt_len + mask
        assert target_spans(tok, seq) == target_spans(tok, c.seq)
        assert not seq.truncated
    assert tok.decode(list(out[0].input_ids)) == "Q: three? A one" + EOS
    # a batch of one pairs an item with itself
    assert mismatched(items, [1]) == [items[1].seq]


def test_mismatched_conversational_keeps_the_completion_mask(tok):
    rows = [
        {"prompt": [msg("user", "a")], "completion": [msg("assistant", "b")], "label": True},
        {
            "prompt": [msg("system", "S"), msg("user", "c")],
            "completion": [msg("assistant", "d"), msg("user", "e"), msg("assistant", "f")],
            "label": False,
        },
    ]
    items, _ = load_feedback(rows, tok, max_length=128)
    assert target_spans(tok, items[1].seq) == ["d" + EOS, "f" + EOS]
    first, second = mismatched(items, [0, 1])
    ids, mask = completion_part(items[1])
    assert first.input_ids == items[0].seq.input_ids[: items[0].prompt_len] + ids
    assert first.target_mask == (0,) * items[0].prompt_len + mask  # 0s inside the completion
    assert tok.decode(list(first.input_ids)) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
        "d<|im_end|>\n<|im_start|>user\ne<|im_end|>\n<|im_start|>assistant\nf<|im_end|>"
    )
    assert target_spans(tok, second) == ["b" + EOS]
    assert prompt_text(tok, items[1]) in tok.decode(list(second.input_ids))


def test_mismatched_truncates_to_the_longest_sequence_of_the_batch(tok):
    rows = [
        {"prompt": " ".join(["long prompt"] * 8), "completion": " ok", "label": True},
        {"prompt": "Q:", "completion": " " + " ".join(["long answer"] * 8), "label": False},
    ]
    items, _ = load_feedback(rows, tok, max_length=64)
    limit = max(len(i.seq) for i in items)
    first, second = mismatched(items, [0, 1])
    assert len(first) == limit and first.truncated
    assert first.input_ids[-1] != tok.eos_token_id
    assert first.target_mask == (0,) * items[0].prompt_len + (1,) * (limit - items[0].prompt_len)
    assert (
        first.input_ids[items[0].prompt_len :]
        == items[1].seq.input_ids[
            items[1].prompt_len : limit - items[0].prompt_len + items[1].prompt_len
        ]
    )
    assert not second.truncated and target_spans(tok, second) == [" ok" + EOS]


# ---------------------------------------------------------------- fingerprint, kinds


def test_fingerprint_counts_targets():
    seq = Sequence((1, 2, 3), (0, 1, 1))
    a = Feedback(seq, 1.0, 1)
    assert data_fingerprint([a]) == data_fingerprint(
        [Feedback(Sequence((1, 2, 3), (0, 1, 1)), 1.0, 1)]
    )
    assert data_fingerprint([a]) != data_fingerprint([Feedback(seq, 0.0, 1)])
    assert data_fingerprint([Feedback(seq, 0.5, 1, "score")]) != data_fingerprint(
        [Feedback(seq, 0.25, 1, "score")]
    )
    assert data_fingerprint([a]) != data_fingerprint([seq])
    other_ids = Feedback(Sequence((1, 2, 4), (0, 1, 1)), 1.0, 1)
    other_mask = Feedback(Sequence((1, 2, 3), (0, 0, 1)), 1.0, 2)
    assert data_fingerprint([a]) != data_fingerprint([other_ids])
    assert data_fingerprint([a]) != data_fingerprint([other_mask])
    # a fixed value: the key must not depend on the process
    assert data_fingerprint([a]) == FEEDBACK_FINGERPRINT


def test_feedback_checks_and_kind():
    seq = Sequence((1, 2, 3), (0, 1, 1))
    with pytest.raises(ValueError, match="target"):
        Feedback(seq, 1.5, 1, "score")
    with pytest.raises(ValueError, match="0.0 or 1.0"):
        Feedback(seq, 0.5, 1)
    with pytest.raises(ValueError, match="prompt_len"):
        Feedback(seq, 1.0, 3)
    with pytest.raises(ValueError, match="one kind"):
        feedback_kind([Feedback(seq, 1.0, 1), Feedback(seq, 0.5, 1, "score")])
    with pytest.raises(ValueError, match="no items"):
        feedback_kind([])


def test_detect_kind(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    )
    implicit = tmp_path / "implicit.json"
    implicit.write_text(json.dumps([{"chosen": "a b", "rejected": "a c"}]))
    labels = write_jsonl(tmp_path / "labels.jsonl", ["{broken", "", GOOD_LABEL])
    scores = write_jsonl(tmp_path / "scores.jsonl", [GOOD_SCORE])
    assert detect_kind(pairs) == "pairs"
    assert detect_kind(implicit) == "pairs"
    assert detect_kind(labels) == "unpaired"
    assert detect_kind(scores) == "unpaired"
    assert detect_kind([GOOD_LABEL]) == "unpaired"

    sft = write_jsonl(tmp_path / "sft.jsonl", ["", {"prompt": "a", "completion": " b"}])
    with pytest.raises(DataError) as err:
        detect_kind(sft)
    assert_located(err.value, "sft.jsonl", 2, None)
    assert "cannot tell preference pairs from unpaired feedback" in str(err.value)
    both = write_jsonl(tmp_path / "both.jsonl", [{**GOOD_LABEL, "chosen": " x", "rejected": " y"}])
    with pytest.raises(DataError, match="both.jsonl: line 1"):
        detect_kind(both)
    broken = write_jsonl(tmp_path / "broken.jsonl", ["{broken"])
    with pytest.raises(DataError, match="broken.jsonl: line 1: invalid JSON"):
        detect_kind(broken)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        detect_kind(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- label_threshold


def test_label_threshold_turns_mapped_scores_into_labels(tok):
    rows = [GOOD_SCORE | {"score": s} for s in (0, 4.99, 5, 7, 10)]
    items, _ = load_feedback(rows, tok, max_length=64, score_range=(0, 10), label_threshold=0.5)
    assert [f.target for f in items] == [0.0, 0.0, 1.0, 1.0, 1.0]  # mapped score >= 0.5
    assert feedback_kind(items) == "label"
    labels, _ = load_feedback([GOOD_LABEL], tok, max_length=64, label_threshold=0.9)
    assert [f.target for f in labels] == [1.0]  # label data ignores it


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_label_threshold_is_a_mapped_score_in_0_1(tok, bad):
    with pytest.raises(ValueError, match="label_threshold"):
        load_feedback([GOOD_SCORE], tok, max_length=64, score_range=(0, 10), label_threshold=bad)
