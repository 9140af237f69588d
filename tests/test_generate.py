"""Batched generation on builtin:tiny (deterministic, through the chat template, left-padded),
prompts and references read from data files, and the generations file."""

import json

import pytest
import torch
from conftest import perturbed_tiny, write_jsonl

from unitune.data import DataError
from unitune.eval.generate import (
    GenerationError,
    generate,
    load_prompts,
    render_prompt,
    write_generations,
)

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France? Please answer briefly."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ],
]


@pytest.fixture(scope="module")
def tiny():
    return perturbed_tiny()


def test_generation_is_deterministic_and_batching_does_not_change_it(tiny):
    model, tok = tiny
    model.train()
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    b = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    one = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert a == b == one
    assert all(isinstance(r, str) and r for r in a)
    assert not any("<|im_end|>" in r or "<|im_start|>" in r for r in a)
    assert model.training  # its mode given back
    assert torch.equal(torch.get_rng_state(), state)  # greedy, and the RNG left alone

    s1 = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=3)
    s2 = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=3)
    assert s1 == s2
    assert torch.equal(torch.get_rng_state(), state)  # sampling ran in a forked RNG


def test_generation_uses_the_chat_template_left_padded(tiny, monkeypatch):
    model, tok = tiny
    import unitune.eval.generate as gen

    seen = {}
    original = gen.decode

    def spy(model, ids, mask, **kwargs):
        seen.update(input_ids=ids, attention_mask=mask)
        return original(model, ids, mask, **kwargs)

    monkeypatch.setattr(gen, "decode", spy)
    generate(model, tok, PROMPTS[:2], max_new_tokens=2, batch_size=2)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding: the shorter row starts padded
    texts = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]
    expected = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS[:2]
    ]
    assert texts == expected
    assert expected[0].endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, "plain text") == "plain text"


def test_generation_equals_hf_generate(tiny):
    """The responses are HF `generate`'s (a fresh config with the EOS ids and the pad token),
    greedy and sampled with the same seed."""
    from transformers import GenerationConfig

    from unitune.eval.generate import eos_ids, forked_rng, left_pad

    model, tok = tiny
    for sampled in (False, True):
        ours = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4,
                        do_sample=sampled, temperature=0.9, top_p=0.8, seed=5)  # fmt: skip
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in
                [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in PROMPTS]]  # fmt: skip
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        ids, mask = left_pad([rows[i] for i in order], tok.pad_token_id, torch.device("cpu"))
        options = {"temperature": 0.9, "top_p": 0.8, "top_k": 0} if sampled else {}
        config = GenerationConfig(max_new_tokens=12, do_sample=sampled, use_cache=True,
                                  eos_token_id=eos_ids(model, tok),
                                  pad_token_id=tok.pad_token_id, **options)  # fmt: skip
        with forked_rng(torch.device("cpu"), 5), torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        theirs = [""] * len(rows)
        for i, row in zip(order, new[:, ids.shape[1] :].tolist(), strict=True):
            theirs[i] = tok.decode(row, skip_special_tokens=True).strip()
        assert ours == theirs


def test_generation_errors(tiny):
    model, tok = tiny
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, tok, PROMPTS, do_sample=True, temperature=0.0)
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(GenerationError, match="chat template"):
            generate(model, tok, PROMPTS)
    finally:
        tok.chat_template = saved
    assert generate(model, tok, []) == []


def test_prompts_and_references_from_preference_and_sft_files(tmp_path):
    pref = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "Ahoy! 4, matey!"}],
                "rejected": [{"role": "assistant", "content": "4"}],
            }
        ],
    )
    (p,) = load_prompts(pref)
    assert p.prompt == [{"role": "user", "content": "2+2?"}]
    assert p.reference == "Ahoy! 4, matey!"
    assert p.where == f"{pref}: line 1"

    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "See you"},
                ]
            },
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        ],
    )
    items = load_prompts(sft, max_samples=1)
    assert len(items) == 1
    assert [m["content"] for m in items[0].prompt] == ["Hi", "Hello", "Bye"]
    assert items[0].reference == "See you"

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q: 1+1?", "completion": " 2"}])
    (q,) = load_prompts(plain)
    assert (q.prompt, q.reference) == ("Q: 1+1?", "2")

    renamed = write_jsonl(tmp_path / "cols.jsonl", [{"q": "a?", "good": "b", "bad": "c"}])
    (r,) = load_prompts(renamed, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (r.prompt, r.reference) == ("a?", "b")


def test_bad_prompt_records_name_the_file_line_and_field(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"prompt": "a", "rejected": "c"}])
    with pytest.raises(DataError, match=r"bad.jsonl: line 2, field 'chosen': missing"):
        load_prompts(path)
    assert len(load_prompts(path, on_bad_record="skip")) == 1
    broken = write_jsonl(tmp_path / "broken.jsonl", [good, "{not json"])
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_prompts(broken)
    unpaired = write_jsonl(
        tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}]
    )
    with pytest.raises(DataError, match="line 1: unpaired feedback"):
        load_prompts(unpaired)
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_generations_are_written_atomically(tmp_path):
    out = tmp_path / "eval" / "generations.jsonl"
    write_generations(out, ["p1", PROMPTS[0]], ["r1", "r2"], ["ref1", None])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"prompt": "p1", "response": "r1", "reference": "ref1"},
        {"prompt": PROMPTS[0], "response": "r2", "reference": None},
    ]
    write_generations(out, ["p"], ["r"])
    assert len(out.read_text().splitlines()) == 1
    assert sorted(x.name for x in out.parent.iterdir()) == ["generations.jsonl"]  # no temp left
    with pytest.raises(ValueError):
        write_generations(out, ["p"], [])
