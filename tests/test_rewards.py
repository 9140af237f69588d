"""Rewards for online training (`unitune.rewards`): every spec form, the weighted combination
with `None` (TRL's nansum), the one-line errors naming the reward and the record, a reward model
with another tokenizer than the policy's (the text re-tokenised), and the shaping by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unitune.judges.demo import demo_score
from unitune.models.builtin import tiny_tokenizer
from unitune.rewards import (
    RewardError,
    RewardProgress,
    RewardSpecError,
    RunningStats,
    build_rewards,
    clip,
    missing_eos,
    parse_reward_spec,
    shape,
    una_map,
)

CONV = [{"role": "user", "content": "Describe a cat."}]

USER_REWARDS = '''
import math

SEEN = {}
NOT_A_FUNCTION = 3


def words(prompts, completions, completion_ids, **kwargs):
    """TRL's signature, on plain-string prompts."""
    SEEN["words"] = dict(prompts=prompts, completions=completions,
                         completion_ids=completion_ids, **kwargs)
    return [float(len(c.split())) for c in completions]


def spy(prompts, completions, completion_ids, **kwargs):
    SEEN["spy"] = dict(prompts=prompts, completions=completions,
                       completion_ids=completion_ids, **kwargs)
    kwargs["log_metric"]("spy/calls", 1.0)
    kwargs["log_extra"]("spy_note", [f"n{i}" for i in range(len(completions))])
    return [kwargs["trainer_state"].global_step * 1.0] * len(completions)


def sometimes(prompts, completions, completion_ids, **kwargs):
    """None where the completion has no digit."""
    return [None if not any(ch.isdigit() for ch in c) else 1.0 for c in completions]


def boom_on_b(prompts, completions, completion_ids, **kwargs):
    if any("b" in c for c in completions):
        raise ValueError("cannot parse\\nthe answer")
    return [0.0] * len(completions)


def short(prompts, completions, completion_ids, **kwargs):
    return [1.0] * (len(completions) - 1)


def text_value(prompts, completions, completion_ids, **kwargs):
    return [1.0, "2.0", 3.0][: len(completions)]


def nan_value(prompts, completions, completion_ids, **kwargs):
    return [1.0, math.nan, 0.0][: len(completions)]


def inf_value(prompts, completions, completion_ids, **kwargs):
    return [math.inf] * len(completions)


def scalar(prompts, completions, completion_ids, **kwargs):
    return 1.0


def loose_types(prompts, completions, completion_ids, **kwargs):
    import numpy as np
    import torch
    return (v for v in [True, np.float32(0.5), torch.tensor(2.0), 3][: len(completions)])


async def later(prompts, completions, completion_ids, **kwargs):
    return [0.25] * len(completions)


class Holder:
    @staticmethod
    def fn(prompts, completions, completion_ids, **kwargs):
        return [7.0] * len(completions)
'''


@pytest.fixture
def user_py(tmp_path) -> Path:
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def score(rewards, prompts, completions, columns=None, records=None, **kw):
    n = len(completions)
    return rewards.score(
        prompts,
        completions,
        [[i] for i in range(n)],
        columns or {},
        records or [f"p.jsonl: line {i + 1}" for i in range(n)],
        **kw,
    )


# ------------------------------------------------------------------------- Python functions
def test_a_file_function_gets_what_trl_passes(user_py):
    import sys

    rewards = build_rewards([(f"{user_py}:spy", 1.0), (f"{user_py}:spy", 2.0)])
    assert rewards.names == [f"{user_py}:spy", f"{user_py}:spy#2"]  # each name unique
    prompts, completions = ["Say hi", CONV], ["hi there friend", "a cat"]
    out = score(
        rewards,
        prompts,
        completions,
        {"answer": ["x", "y"], "prompt": ["dropped", "dropped"]},
        step=5,
        max_steps=9,
    )
    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(user_py))
    seen = module.SEEN["spy"]
    # TRL's forms: a string prompt's completion is the text, a conversation's one assistant turn
    assert seen["prompts"] == prompts
    assert seen["completions"] == ["hi there friend", [{"role": "assistant", "content": "a cat"}]]
    assert seen["completion_ids"] == [[0], [1]]
    assert seen["answer"] == ["x", "y"] and "prompt" not in seen
    assert seen["trainer_state"] == RewardProgress(global_step=5, max_steps=9)
    assert out.per_function[f"{user_py}:spy"] == [5.0, 5.0]
    assert out.combined.tolist() == [15.0, 15.0]
    assert out.logged_metrics == {"spy/calls": [1.0, 1.0]}
    assert out.logged_columns == {"spy_note": ["n0", "n1", "n0", "n1"]}


def test_a_module_function_and_trls_own_reward_unchanged(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod_q7.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = build_rewards(
        [
            ("my_reward_mod_q7:words", 1.0),
            ("my_reward_mod_q7:Holder.fn", 1.0),
            ("my_reward_mod_q7:later", 1.0),  # async, as TRL allows
        ]
    )
    completions = ["<think>\nhmm\n</think>\nA cat.", "A cat."]
    out = score(rewards, ["Q", "Q"], completions)
    assert out.per_function["my_reward_mod_q7:words"] == [5.0, 2.0]
    assert out.per_function["my_reward_mod_q7:Holder.fn"] == [7.0, 7.0]
    assert out.per_function["my_reward_mod_q7:later"] == [0.25, 0.25]
    # TRL's own function reads completion[0]["content"]: on conversations it scores as TRL
    # documents; on plain-string prompts it gets strings, as in TRL, and fails there
    from trl.rewards import think_format_reward

    trl_fn = build_rewards([("trl.rewards:think_format_reward", 1.0)])
    out = score(trl_fn, [CONV, CONV], completions)
    expected = think_format_reward([[{"content": c}] for c in completions])
    assert out.per_function["trl.rewards:think_format_reward"] == expected == [1.0, 0.0]
    with pytest.raises(RewardError, match="on p.jsonl: line 1: raised TypeError"):
        score(trl_fn, ["Q", "Q"], completions)


def test_loose_but_numeric_outputs_are_read_as_trl_reads_them(user_py):
    rewards = build_rewards([f"{user_py}:loose_types"])  # a plain spec has weight 1
    out = score(rewards, ["q"] * 4, ["a", "b", "c", "d"])
    assert out.per_function[f"{user_py}:loose_types"] == [1.0, 0.5, 2.0, 3.0]


# ------------------------------------------------------------------------- the combination
def test_weights_and_none_combine_as_trls_nansum(user_py):
    rewards = build_rewards([(f"{user_py}:sometimes", 2.0), ("format:cat", -0.5)])
    rewards_none = build_rewards([(f"{user_py}:sometimes", 2.0)])
    completions = ["a cat 1", "a dog 2", "a cat", "a dog"]
    out = score(rewards, ["q"] * 4, completions)
    per = out.per_function
    assert per[f"{user_py}:sometimes"] == [1.0, 1.0, None, None]
    assert per["format:cat"] == [1.0, 0.0, 1.0, 0.0]
    # by hand: 2*1 - 0.5*1, 2*1 - 0, (None) - 0.5*1, (None) - 0
    assert out.combined.dtype == torch.float64
    assert out.combined.tolist() == [1.5, 2.0, -0.5, 0.0]
    # TRL 1.16: (rewards_per_func * weights).nansum(dim=1), NaN where every function gave None
    table = torch.tensor([[math.nan if v is None else v for v in per[n]] for n in per]).T
    trl = (table * torch.tensor([2.0, -0.5])).nansum(dim=1)
    trl[torch.isnan(table).all(dim=1)] = math.nan
    assert torch.equal(out.combined.float(), trl)
    only = score(rewards_none, ["q"] * 4, completions).combined
    assert only[:2].tolist() == [2.0, 2.0] and torch.isnan(only[2:]).all()


# ------------------------------------------------------------------------- programmatic
def test_format_and_length_by_hand():
    rewards = build_rewards([("format:^Ahoy.*matey!$", 1.0), ("length:4", 1.0)])
    completions = ["Ahoy! a cat, matey!", "a cat", "", "one two three four five six seven eight"]
    out = score(rewards, [CONV] * 4, completions)
    assert out.per_function["format:^Ahoy.*matey!$"] == [1.0, 0.0, 0.0, 0.0]
    # -|words - 4| / 4: 4 words, 2, 0, 8
    assert out.per_function["length:4"] == [0.0, -0.5, -1.0, -1.0]


# ------------------------------------------------------------------------- judges
def test_a_pointwise_judge_scores_against_the_reference_column():
    rewards = build_rewards([("judge:demo", 1.0)])
    completions = ["Ahoy! A cat purrs, matey!", "A cat purrs."]
    ref = "Ahoy! A cat purrs, matey!"
    for columns, refs in (
        ({"answer": [ref, ref]}, [ref, ref]),
        ({"reference": ["x", "x"], "answer": [ref, ref]}, ["x", "x"]),  # reference first
        ({"chosen": [[{"role": "assistant", "content": ref}]] * 2}, [ref, ref]),  # a pair's
        ({"other": [1, 2]}, ["", ""]),  # none: ""
    ):
        out = score(rewards, [CONV, CONV], completions, columns)
        expected = [demo_score(CONV, c, r) for c, r in zip(completions, refs, strict=True)]
        assert out.per_function["judge:demo"] == pytest.approx(expected)
    assert out.per_function["judge:demo"] != [0.0, 0.0]  # the style alone still scores


def test_a_pairwise_judge_is_refused():
    with pytest.raises(RewardSpecError, match="'judge:openai:gpt-x': a pairwise judge"):
        build_rewards([("judge:openai:gpt-x", 1.0)])


# ------------------------------------------------------------------------- reward models
RM_WORDS = ["user", "assistant", ":", "describe", "a", "cat", ".", "is", "great", "good", "bad"]


def word_tokenizer():
    """A word-level tokenizer with its own vocabulary and chat template: nothing like the
    policy's GPT-2 BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *RM_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] | lower }} {% endfor %}[EOS]"
    )
    return tok


def save_rm(path: Path, num_labels: int = 1) -> Path:
    """A tiny random Llama sequence classifier with the word tokenizer, saved (safetensors)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = word_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    assert any(p.suffix == ".safetensors" for p in path.iterdir())
    return path


def test_a_reward_model_with_another_tokenizer_reads_its_own_tokens(tmp_path):
    path = save_rm(tmp_path / "rm")
    rewards = build_rewards([(f"rm:{path}", 1.0)], device="cpu")
    judge = rewards.rewards[0].fn.judge
    seen = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))

    handle = judge.model.register_forward_pre_hook(hook, with_kwargs=True)
    policy = tiny_tokenizer()
    completions = ["A cat is great.", "A cat is bad."]
    policy_ids = [policy(c, add_special_tokens=False)["input_ids"] for c in completions]
    prompts = [CONV, "Describe a cat."]
    out = rewards.score(prompts, completions, policy_ids, {}, ["p: line 1", "p: line 2"])

    rm_tok = word_tokenizer()
    expected = []
    for prompt, completion in zip(prompts, completions, strict=True):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = rm_tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], tokenize=False
        )
        expected.append(rm_tok(text, add_special_tokens=False)["input_ids"])
    assert seen == expected  # the RM's own encoding of the text, with its chat template
    assert all(rm_tok.unk_token_id not in row for row in seen)
    assert seen[0] != policy_ids[0] and max(max(r) for r in policy_ids) >= len(rm_tok)
    handle.remove()
    with torch.no_grad():
        direct = [judge.model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in expected]
    assert out.per_function[f"rm:{path}"] == pytest.approx(direct, abs=1e-5)
    assert out.combined.tolist() == pytest.approx(direct, abs=1e-5)


def test_reward_models_refused_before_training(tmp_path):
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(RewardSpecError, match="pickle") as info:
        build_rewards([(f"rm:{pickles}", 1.0)])
    message = str(info.value)
    assert message.startswith(f"online.rewards: reward 'rm:{pickles}': has only PyTorch pickle")
    assert "\n" not in message
    two = save_rm(tmp_path / "two", num_labels=2)
    for spec in (f"rm:{two}", f"judge:rm:{two}"):
        with pytest.raises(RewardSpecError, match="has 2 labels; a reward needs num_labels 1"):
            build_rewards([(spec, 1.0)], device="cpu")
    with pytest.raises(RewardSpecError, match="no such directory"):
        build_rewards([(f"rm:{tmp_path / 'nowhere'}", 1.0)])
    with pytest.raises(RewardSpecError, match="is a file"):
        build_rewards([(f"rm:{pickles / 'config.json'}", 1.0)])


# ------------------------------------------------------------------------- spec errors
def test_the_fingerprint_follows_what_each_reward_reads(user_py, tmp_path):
    """A cache keyed on the rewards (the calibration's) sees an edited reward function and a
    retrained reward model; a programmatic reward is its spec."""
    from unitune.rewards import rewards_fingerprint

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"weights one")
    specs = [f"{user_py}:words", f"rm:{rm}", "length:10"]
    first = rewards_fingerprint(specs)
    assert rewards_fingerprint(specs) == first
    (rm / "model.safetensors").write_bytes(b"weights two")
    second = rewards_fingerprint(specs)
    assert second != first
    user_py.write_text(user_py.read_text() + "\n# edited\n")
    assert rewards_fingerprint(specs) not in (first, second)
    assert rewards_fingerprint(["length:10"]) != rewards_fingerprint(["length:11"])


def test_bad_specs_are_one_line_errors_naming_the_spec(user_py, tmp_path):
    cases = [
        ("nokind", "'nokind': no kind; expected rm:PATH_OR_ID, judge:SPEC, format:REGEX"),
        ("what ever:fn", "unknown kind 'what ever'"),
        ("rm:", "'rm:': no PATH_OR_ID"),
        ("judge:", "'judge:': no SPEC"),
        ("judge:nope", "judge 'nope': unknown"),
        ("format:(", "'format:(': bad regular expression"),
        ("length:0", "'length:0': N must be a positive whole number"),
        ("length:ten", "N must be a positive whole number of words, got 'ten'"),
        (f"{user_py}:", "is not a function name"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz': ModuleNotFound"),
        (f"{tmp_path / 'missing.py'}:fn", "no such file"),
        (f"{user_py}:missing", f"file '{user_py}' has no 'missing'"),
        (f"{user_py}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not callable (int)"),
    ]
    for spec, words in cases:
        with pytest.raises(RewardSpecError) as info:
            build_rewards([(spec, 1.0)])
        message = str(info.value)
        assert words in message, (spec, message)
        assert message.startswith(f"online.rewards: reward {spec!r}: ")
        assert "\n" not in message
    broken = tmp_path / "broken_rewards.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(RewardSpecError, match="cannot import file .*RuntimeError: no GPU here"):
        build_rewards([(f"{broken}:fn", 1.0)])
    for weight in (math.nan, "1", True):
        with pytest.raises(RewardSpecError, match="weight"):
            build_rewards([("format:a", weight)])
    with pytest.raises(RewardSpecError, match="no rewards"):
        build_rewards([])
    assert parse_reward_spec("C:/rewards/mine.py:fn").kind == "file"  # a drive's colon
    assert parse_reward_spec("format:a:b").argument == "a:b"  # a pattern's own colons


# ------------------------------------------------------------------------- run-time errors
def test_bad_outputs_stop_naming_the_reward_and_the_record(user_py):
    records = ["prompts.jsonl: line 3", "prompts.jsonl: line 7", "prompts.jsonl: line 9"]
    completions = ["a", "b", "c"]
    cases = {
        # raises on the batch: called on each sample alone, it fails on "b": line 7
        "boom_on_b": ("prompts.jsonl: line 7", "raised ValueError: cannot parse"),
        "short": (
            None,
            "on the batch prompts.jsonl: line 3 .. prompts.jsonl: line 9 "
            "(3 completions): returned 2 values for 3 completions",
        ),  # fmt: skip
        "text_value": ("prompts.jsonl: line 7", "returned '2.0' (str), not a number"),
        "nan_value": ("prompts.jsonl: line 7", "returned nan, not a finite number"),
        "inf_value": ("prompts.jsonl: line 3", "returned inf, not a finite number"),
        "scalar": (None, "returned a float, not a list of 3 numbers"),
    }
    for fn, (record, words) in cases.items():
        spec = f"{user_py}:{fn}"
        rewards = build_rewards([("format:a", 1.0), (spec, 1.0)])
        with pytest.raises(RewardError) as info:
            score(rewards, ["q"] * 3, completions, records=records)
        message = str(info.value)
        assert message.startswith(f"online.rewards: reward {spec!r} "), message
        assert words in message, (fn, message)
        if record is not None:
            assert f"on {record}:" in message
        assert "\n" not in message
        assert info.value.reward == spec and info.value.record == record


def test_a_reward_that_raises_on_one_sample_names_it():
    rewards = build_rewards([("length:2", 1.0)])
    rewards.rewards[0] = type(rewards.rewards[0])(
        "x:fn", "x:fn", 1.0, lambda **kw: 1 / 0, locate=False
    )
    with pytest.raises(RewardError, match="'x:fn' on only.jsonl: line 1: raised ZeroDivision"):
        rewards.score(["q"], ["a"], [[1]], {}, ["only.jsonl: line 1"])


# ------------------------------------------------------------------------- shaping
NAN = math.nan


def test_missing_eos_and_clip_by_hand_keep_nan():
    r = torch.tensor([1.0, NAN, -2.0, 0.5], dtype=torch.float64)
    truncated = torch.tensor([True, True, False, False])
    out = missing_eos(r, truncated, 1.0)
    assert out[[0, 2, 3]].tolist() == [0.0, -2.0, 0.5] and math.isnan(out[1])
    assert torch.equal(missing_eos(r, truncated, None).nan_to_num(9), r.nan_to_num(9))
    c = clip(torch.tensor([3.0, NAN, -3.0, 0.2], dtype=torch.float64), -1.0, 1.0)
    assert c[[0, 2, 3]].tolist() == [1.0, -1.0, 0.2] and math.isnan(c[1])
    assert clip(torch.tensor([3.0, -3.0]), None, 1.0).tolist() == [1.0, -3.0]


def test_una_maps_by_hand():
    r = torch.tensor([0.0, 2.0, NAN, -1.0], dtype=torch.float64)
    s = una_map(r, "sigmoid")
    assert s[[0, 1, 3]].tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.e)])
    assert math.isnan(s[2])
    m = una_map(r, "minmax", range=(-1.0, 1.0))
    assert m[[0, 1, 3]].tolist() == [0.5, 1.0, 0.0] and math.isnan(m[2])  # 2.0 clamped to 1
    stats = RunningStats()
    z = una_map(r, "zscore", stats=stats)
    # the batch's values 0, 2, -1 (NaN left out): mean 1/3, population std sqrt(14/9 / 3 * 3)
    mean, std = 1 / 3, math.sqrt(((0 - 1 / 3) ** 2 + (2 - 1 / 3) ** 2 + (-1 - 1 / 3) ** 2) / 3)
    assert (stats.count, stats.mean, stats.std) == (3, pytest.approx(mean), pytest.approx(std))
    expected = [1 / (1 + math.exp(-(v - mean) / std)) for v in (0.0, 2.0, -1.0)]
    assert z[[0, 1, 3]].tolist() == pytest.approx(expected) and math.isnan(z[2])
    # the statistics updated with another (gathered) batch: here [2, 4], mean 3, std 1
    local = torch.tensor([4.0, NAN], dtype=torch.float64)
    other = RunningStats()
    g = una_map(local, "zscore", stats=other, update=torch.tensor([2.0, 4.0]))
    assert g[0].item() == pytest.approx(1 / (1 + math.exp(-1))) and math.isnan(g[1])
    assert (other.count, other.mean, other.std) == (2, 3.0, 1.0)
    same = una_map(torch.tensor([5.0, 5.0], dtype=torch.float64), "zscore", stats=RunningStats())
    assert same.tolist() == [0.5, 0.5]  # std 0: the floor, z = 0
    assert torch.equal(una_map(r, "none").nan_to_num(9), r.nan_to_num(9))
    with pytest.raises(ValueError, match="minmax needs range"):
        una_map(r, "minmax")
    with pytest.raises(ValueError, match="zscore needs the RunningStats"):
        una_map(r, "zscore")


def test_shape_applies_the_penalty_the_clip_and_the_map_in_order():
    r = torch.tensor([3.0, 0.5, NAN], dtype=torch.float64)
    truncated = torch.tensor([True, True, False])
    out = shape(
        r,
        truncated,
        missing_eos_penalty=1.0,
        clip_range=(-1.0, 1.0),
        score_map="minmax",
        score_range=(-1.0, 1.0),
    )
    # 3 - 1 = 2 -> clipped 1 -> (1 + 1) / 2; 0.5 - 1 = -0.5 -> 0.25; NaN stays NaN
    assert out[:2].tolist() == [1.0, 0.25] and math.isnan(out[2])
    plain = shape(r, truncated)
    assert plain[:2].tolist() == [3.0, 0.5] and math.isnan(plain[2])


def test_running_stats_merge_and_json_round_trip():
    batches = [[1.0, 2.0, NAN], [4.0], [NAN], [-3.0, 10.0, 0.5]]
    whole = RunningStats()
    for b in batches:
        whole.update(b)
    values = np.array([v for b in batches for v in b if not math.isnan(v)])
    assert whole.count == 6
    assert whole.mean == pytest.approx(values.mean(), rel=1e-15)
    assert whole.std == pytest.approx(values.std(), rel=1e-14)  # population std
    assert math.isnan(RunningStats().mean) and math.isnan(RunningStats().std)
    # saved after two batches (as a checkpoint writes JSON), resumed: the same bits
    first = RunningStats()
    for b in batches[:2]:
        first.update(b)
    resumed = RunningStats()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for b in batches[2:]:
        resumed.update(b)
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="lacks m2"):
        RunningStats().load_state_dict({"count": 1, "mean": 0.0})
