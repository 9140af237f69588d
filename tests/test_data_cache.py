"""The data layer at scale: token arrays (`Items`), the tokenized-data cache, tokenizing processes.

What a user relies on: a rerun reads the cache instead of tokenizing and gets exactly the same
items and report; anything that changes the result (content, tokenizer, options) misses; a
damaged or half-written entry is never used; `num_proc` changes nothing but the speed, bad
records included.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import msg, write_jsonl

from unitune.data import (
    DataError,
    Feedback,
    Items,
    Pair,
    Sequence,
    data_fingerprint,
    load_feedback,
    load_preference,
    load_sft,
    split_holdout,
)
from unitune.data import load as load_module
from unitune.data.tokenize import Encoder
from unitune.models.builtin import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pref_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": [msg("user", f"Question {i}: what is {i} plus {i}?")],
            "chosen": [msg("assistant", f"It is {2 * i}." + " Indeed." * (i % 5))],
            "rejected": [msg("assistant", f"Maybe {2 * i + 1}.")],
            "prompt_id": i,
        }
        for i in range(n)
    ]


def no_tokenizing(monkeypatch) -> None:
    def refuse(self, texts):
        raise AssertionError("tokenized although the cache holds this dataset")

    monkeypatch.setattr(Encoder, "encode_many", refuse)


def test_a_rerun_reads_the_cache_and_gets_the_same_items_and_report(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pref.jsonl", pref_rows(40))
    cold, cold_report = load_preference(path, tok, max_length=24, cache_dir=tmp_path / "c")
    plain, _ = load_preference(path, tok, max_length=24)  # no cache at all
    no_tokenizing(monkeypatch)
    warm, warm_report = load_preference(path, tok, max_length=24, cache_dir=tmp_path / "c")
    assert list(warm) == list(cold) == list(plain)
    assert all(isinstance(p, Pair) for p in warm)
    assert isinstance(warm.store.ids, np.memmap)  # read back memory-mapped, not copied
    assert warm_report.cached and not cold_report.cached
    for name in ("n_records", "n_kept", "skipped", "truncated", "unused_columns"):
        assert getattr(warm_report, name) == getattr(cold_report, name)
    assert cold_report.truncated > 0 and cold_report.unused_columns == {"prompt_id": 40}
    assert "from the tokenized-data cache" in warm_report.summary()


@pytest.mark.parametrize(
    "change",
    ["content", "max_length", "template", "on_bad_record", "columns"],
)
def test_anything_that_changes_the_result_misses(tok, tmp_path, change):
    rows = pref_rows(6)
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    kw = {"max_length": 64, "cache_dir": tmp_path / "c"}
    load_preference(path, tok, **kw)
    entries = lambda: sorted(p.name for p in (tmp_path / "c" / "data").iterdir())  # noqa: E731
    before = entries()
    other_tok = tok
    if change == "content":
        rows[3]["chosen"][0]["content"] = "Something else entirely."
        write_jsonl(path, rows)
    elif change == "max_length":
        kw["max_length"] = 20
    elif change == "template":
        other_tok = tiny_tokenizer()
        other_tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    elif change == "on_bad_record":
        kw["on_bad_record"] = "skip"
    else:
        kw["columns"] = {"prompt": "prompt"}
    items, report = load_preference(path, other_tok, **kw)
    assert not report.cached
    assert len(entries()) == len(before) + 1
    if change == "content":
        assert "Something else" in other_tok.decode(list(items[3].chosen.input_ids))


def test_a_damaged_entry_is_rebuilt_and_a_half_written_one_ignored(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "pref.jsonl", pref_rows(8))
    kw = {"max_length": 64, "cache_dir": tmp_path / "c"}
    good = list(load_preference(path, tok, **kw)[0])  # built now: the entry is about to change
    (entry,) = (tmp_path / "c" / "data").iterdir()
    ids = entry / "ids.i32"
    ids.write_bytes(ids.read_bytes()[:-4])  # a torn file: one token short
    with caplog.at_level(logging.WARNING):
        again, report = load_preference(path, tok, **kw)
    assert not report.cached and list(again) == good
    assert caplog.text.count("damaged data cache entry") == 1
    _, report = load_preference(path, tok, **kw)
    assert report.cached  # the rebuilt entry is whole
    # a crash while writing leaves only a temporary directory, which is never read as an entry
    (tmp_path / "c" / "data" / f".{entry.name[:16]}.tmp").mkdir()
    assert load_preference(path, tok, **kw)[1].cached


def test_an_unwritable_cache_only_costs_the_cache(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "pref.jsonl", pref_rows(4))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        items, report = load_preference(path, tok, max_length=64, cache_dir=blocked)
    assert len(items) == 4 and not report.cached
    assert "could not write the data cache entry" in caplog.text


def sft_rows_with_bad_ones(n: int) -> list[dict]:
    rows: list = []
    for i in range(n):
        if i % 7 == 3:
            rows.append({"messages": [msg("user", f"hi {i}")]})  # no assistant turn: bad
        elif i % 11 == 5:
            rows.append({"messages": [msg("user", f"q {i}"), {"role": "assistant", "content": 3}]})
        else:
            rows.append({"messages": [msg("user", f"q {i}"), msg("assistant", f"answer {i}")]})
    return rows


def test_num_proc_changes_nothing_but_speed(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "CHUNK_RECORDS", 5)  # many chunks, errors in several
    path = write_jsonl(tmp_path / "sft.jsonl", sft_rows_with_bad_ones(60))
    one, r1 = load_sft(path, tok, max_length=64, on_bad_record="skip")
    two, r2 = load_sft(path, tok, max_length=64, on_bad_record="skip", num_proc=2)
    assert list(one) == list(two) and len(one) == r1.n_kept
    assert r1 == r2 and sum(r1.skipped.values()) == 60 - len(one) > 5
    # in "error" mode the first bad record in file order is the one named, whichever process
    with pytest.raises(DataError) as err:
        load_sft(path, tok, max_length=64, num_proc=2)
    assert err.value.record == 4 and err.value.field == "messages"  # line 4 = row 3


def test_items_behave_like_the_lists_they_replace(tok, tmp_path):
    rows = pref_rows(30)
    items, _ = load_preference(write_jsonl(tmp_path / "p.jsonl", rows), tok, max_length=40)
    as_list = list(items)
    assert isinstance(items, Items) and len(items) == 30
    assert items[-1] == as_list[-1] and list(items[3:9]) == as_list[3:9]
    assert list(items.take([5, 1, 5])) == [as_list[5], as_list[1], as_list[5]]
    flat = items.sequences()
    assert list(flat) == [p.chosen for p in as_list] + [p.rejected for p in as_list]
    assert data_fingerprint(flat) == data_fingerprint(list(flat))
    assert data_fingerprint(items) == data_fingerprint(as_list)
    assert flat.n_targets().tolist() == [sum(s.target_mask) for s in flat]
    assert items.lengths().tolist() == [max(len(p.chosen), len(p.rejected)) for p in as_list]
    train, held = split_holdout(items, 0.2, seed=1)
    list_train, list_held = split_holdout(as_list, 0.2, seed=1)
    assert isinstance(train, Items) and list(train) == list_train and list(held) == list_held
    unpaired = items.unpaired()
    assert [(f.seq, f.target) for f in unpaired][:2] == [
        (as_list[0].chosen, 1.0),
        (as_list[0].rejected, 0.0),
    ]
    assert data_fingerprint(unpaired) == data_fingerprint(list(unpaired))
    with pytest.raises(IndexError):
        items[30]


def test_feedback_items_keep_targets_and_prompt_lengths(tok, tmp_path):
    rows = [
        {"prompt": f"Rate {i}:", "completion": f" fine {i}", "score": float(i)} for i in range(6)
    ]
    path = write_jsonl(tmp_path / "fb.jsonl", rows)
    items, _ = load_feedback(path, tok, max_length=64, score_range=(0, 5), cache_dir=tmp_path / "c")
    warm, report = load_feedback(
        path, tok, max_length=64, score_range=(0, 5), cache_dir=tmp_path / "c"
    )
    assert report.cached
    for a, b in zip(items, warm, strict=True):
        assert isinstance(b, Feedback) and a == b and b.kind == "score"
    assert [f.target for f in warm] == [i / 5 for i in range(6)]
    prompt = tok("Rate 0:", add_special_tokens=False)["input_ids"]
    assert warm[0].prompt_len == len(prompt)
    labels, _ = load_feedback(
        path, tok, max_length=64, score_range=(0, 5), label_threshold=0.5, cache_dir=tmp_path / "c"
    )
    assert [f.target for f in labels] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert labels[0].kind == "label"


def test_batched_encoding_equals_one_text_at_a_time(tok):
    enc = Encoder(tok)
    texts = ["", "Hello world", "<|im_start|>user\nHi<|im_end|>\n", " spaced  out ", "é ü 日本"]
    assert enc.encode_many(texts) == [enc.encode(t) for t in texts]


def test_memory_sources_are_not_cached(tok, tmp_path):
    rows = [{"prompt": "Q", "completion": " A"}]
    _, report = load_sft(rows, tok, max_length=16, cache_dir=tmp_path / "c")
    _, report = load_sft(rows, tok, max_length=16, cache_dir=tmp_path / "c")
    assert not report.cached and not (tmp_path / "c").exists()


def test_a_cache_entry_holds_compact_arrays_not_python_objects(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pref_rows(50))
    items, _ = load_preference(path, tok, max_length=64, cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c" / "data").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    n_tokens = meta["lengths"]["ids.i32"]
    assert n_tokens == len(items.store.ids) == sum(len(p.chosen) + len(p.rejected) for p in items)
    assert (entry / "ids.i32").stat().st_size == 4 * n_tokens
    assert items.store.nbytes < 6 * n_tokens + 32 * 2 * len(items)
    assert isinstance(items[0].chosen, Sequence)


def test_held_out_sets_can_be_capped_and_data_options_reach_the_loader(tiny_config, tmp_path):
    from unitune.config import parse_config
    from unitune.training.batches import load_data

    raw = tiny_config("alright")
    raw["data"]["sft"]["eval_max_samples"] = 2
    raw["data"]["num_proc"] = 2
    raw["cache_dir"] = str(tmp_path / "cache")
    data = load_data(parse_config(raw), tiny_tokenizer())
    assert len(data["sft"].eval) == 2 and isinstance(data["sft"].eval, Items)
    assert len(data["pref"].eval) > 2
    assert len(list((tmp_path / "cache" / "data").iterdir())) >= 2  # both sets cached
    again = load_data(parse_config(raw), tiny_tokenizer())
    assert again["sft"].report.cached and list(again["sft"].train) == list(data["sft"].train)


def test_fast_rendering_is_exactly_apply_chat_template(tok):
    enc = Encoder(tok)
    assert enc._template is not None  # the compiled template passed its probe
    convs = [
        [msg("user", "Hi")],
        [
            msg("system", "Be {{ brief }}."),
            msg("user", "2+2?"),
            msg("assistant", "4"),
            msg("user", "And <b>3+3</b>?"),
        ],  # fmt: skip
        [{"role": "user", "content": "named", "name": "ann"}],
        [{"role": "user", "content": "none", "tool_calls": None}],  # not plain: transformers' path
    ]
    for conv in convs:
        for gen in (True, False):
            want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert enc.render(conv, generation_prompt=gen) == want


def test_a_template_that_renders_differently_falls_back_to_transformers(monkeypatch):
    tok = tiny_tokenizer()
    real = tok.apply_chat_template
    # a transformers whose apply_chat_template does more than render the template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: real(*a, **k) + "!")
    enc = Encoder(tok)
    assert enc._template is None  # the probe saw the difference
    conv = [msg("user", "Hi")]
    assert enc.render(conv, generation_prompt=True).endswith("assistant\n!")


def test_lines_parsed_in_the_tokenizing_processes_keep_their_numbers(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "CHUNK_RECORDS", 3)
    rows = [json.dumps({"prompt": f"Q{i}", "completion": f" A{i}"}) for i in range(9)]
    rows[5] = '{"prompt": "broken'  # line 7 below
    text = rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n\u3000\n"  # a blank and a whitespace line
    path = tmp_path / "sft.jsonl"
    path.write_text(text, encoding="utf-8")
    for n in (1, 2):
        items, report = load_sft(path, tok, max_length=16, on_bad_record="skip", num_proc=n)
        assert len(items) == 8 and report.n_records == 9 and report.skipped == {"invalid_json": 1}
        with pytest.raises(DataError) as err:
            load_sft(path, tok, max_length=16, num_proc=n)
        assert err.value.record == 7 and "invalid JSON" in str(err.value)
