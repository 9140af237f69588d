"""Judges and the win rate: the demo judge's rule, a stub reward model with hand-set weights,
both-orders averaging against a position-biased pairwise judge, and the OpenAI-compatible judge
against a local HTTP server (request, auth header, retries, the key kept secret)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from judge_server import JudgeServer, closed_port, no_proxy  # noqa: F401 (autouse)

from unitune.config import ConfigError, parse_config
from unitune.judges.base import JudgeError
from unitune.judges.demo import demo_score, demo_style, token_f1
from unitune.judges.openai import OpenAIJudge, parse_verdict
from unitune.judges.programmatic import ProgrammaticJudge, register_judge
from unitune.judges.registry import make_judge, parse_judge_spec
from unitune.judges.winrate import win_rate
from unitune.models.builtin import tiny_tokenizer
from unitune.models.errors import ModelLoadError

DEMO = Path(__file__).resolve().parents[1] / "src" / "unitune" / "study" / "demo_data"
KEY = "sk-test-SECRET-4242"


PROMPT = [{"role": "user", "content": "Who was the only US President to resign?"}]


# --------------------------------------------------------------------------------------------
# The demo judge


def test_demo_judge_rewards_the_style_and_the_content():
    ref = "Ahoy! Richard Nixon, matey!"
    assert demo_score(PROMPT, ref, ref) == 1.0
    assert demo_score(PROMPT, "Ahoy! matey!", ref) == 0.5  # style, no content
    assert demo_score(PROMPT, "Richard Nixon", ref) == 0.5  # content, plain style
    assert demo_style("Ahoy! Richard Nixon") == 0.5
    assert demo_style("Richard Nixon, matey?") == 0.5
    assert demo_score(PROMPT, "Ahoy! Richard M. Nixon, matey!", ref) == pytest.approx(0.9)
    assert token_f1("Richard M. Nixon", ref) == pytest.approx(0.8)

    judge = make_judge("demo")
    responses = ["Ahoy! matey!", "Richard Nixon", ref, "Ahoy! Richard M. Nixon, matey!"]
    result = win_rate(judge, [PROMPT] * 4, responses, [ref] * 4)
    assert (result.wins, result.ties, result.losses, result.n) == (0, 1, 3, 4)
    assert result.win_rate == pytest.approx(0.125)
    assert result.judge == "demo"

    # against a plain reference the style wins, and the style alone only ties the content alone
    plain = "Richard Nixon"
    result = win_rate(
        judge, [PROMPT] * 2, ["Ahoy! Richard Nixon, matey!", "Ahoy! matey!"], [plain] * 2
    )
    assert result.outcomes == (1.0, 0.5)


def test_demo_judge_matches_the_demo_data():
    """Every chosen answer of the demo's held-out pairs has the full style; every rejected one
    has none and the chosen content."""
    for line in (DEMO / "pref_eval.jsonl").open():
        rec = json.loads(line)
        chosen, rejected = rec["chosen"][-1]["content"], rec["rejected"][-1]["content"]
        assert demo_style(chosen) == 1.0, chosen
        assert demo_style(rejected) == 0.0, rejected
        assert demo_score(rec["prompt"], rejected, chosen) == pytest.approx(0.5), rejected


# --------------------------------------------------------------------------------------------
# Win-rate plumbing, pointwise and pairwise


def test_pointwise_ties_within_the_tolerance_and_the_standard_error():
    judge = ProgrammaticJudge("len", lambda p, r, ref: float(len(r)))
    result = win_rate(judge, ["p"] * 4, ["aaa", "aa", "a", "bb"], ["aa", "aa", "aa", "cc"])
    assert result.outcomes == (1.0, 0.5, 0.0, 0.5)
    assert (result.wins, result.ties, result.losses) == (1, 2, 1)
    assert result.win_rate == 0.5
    assert result.win_rate_se == pytest.approx(math.sqrt((0.25 + 0 + 0.25 + 0) / 3 / 4))
    noisy = ProgrammaticJudge("noisy", lambda p, r, ref: 1.0 + (1e-7 if r == "x" else 0.0))
    assert win_rate(noisy, ["p"], ["x"], ["y"]).ties == 1
    assert win_rate(noisy, ["p"], ["x"], ["y"], tol=0.0).wins == 1
    assert win_rate(judge, ["p"], ["a"], ["a"]).win_rate_se == 0.0  # one prompt


class PositionBiased:
    """Prefers the longer response, but picks the first one whenever lengths are within 3."""

    name = "biased"
    kind = "pairwise"

    def __init__(self):
        self.calls = []

    def prefer(self, prompts, first, second):
        self.calls.append((list(first), list(second)))
        return [1.0 if len(a) >= len(b) - 3 else 0.0 for a, b in zip(first, second, strict=True)]


def test_pairwise_judges_are_asked_in_both_orders_and_averaged():
    judge = PositionBiased()
    responses = ["a much longer answer", "abcd", "ab"]
    references = ["short", "abc", "a much longer reference"]
    result = win_rate(judge, ["p"] * 3, responses, references)
    assert judge.calls == [(responses, references), (references, responses)]
    # clearly longer: a win in both orders; close: "first wins" both times = a tie; shorter: loss
    assert result.outcomes == (1.0, 0.5, 0.0)
    assert (result.wins, result.ties, result.losses) == (1, 1, 1)

    class AlwaysFirst(PositionBiased):
        def prefer(self, prompts, first, second):
            return [1.0] * len(first)

    assert win_rate(AlwaysFirst(), ["p"] * 2, ["x", "y"], ["z", "w"]).win_rate == 0.5

    class Mumbles(PositionBiased):
        def prefer(self, prompts, first, second):
            return [None] * len(first)

    mumbled = win_rate(Mumbles(), ["p"] * 2, ["x", "y"], ["z", "w"])
    assert (mumbled.ties, mumbled.unparsed) == (2, 4)
    assert mumbled.as_dict()["unparsed"] == 4


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A", 1.0),
        ("B.", 0.0),
        ("**B**", 0.0),
        ("[[A]]", 1.0),
        ("Response B", 0.0),
        ("Response A is better because it answers.", 1.0),
        ("A better response is B.", 0.0),
        ("The better one is A", 1.0),
        ("Answer: B", 0.0),
        ("Verdict - A", 1.0),
        ("B\n\nIt is more helpful.", 0.0),
        ("Tie", 0.5),
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_verdicts_are_parsed(text, verdict):
    assert parse_verdict(text) == verdict


def test_judge_specs():
    assert parse_judge_spec("demo") == ("programmatic", "demo")
    assert parse_judge_spec("rm:./rm") == ("rm", "./rm")
    assert parse_judge_spec("openai:gpt-4o-mini") == ("openai", "gpt-4o-mini")
    for bad in ("nope", "gpt:x", "rm:", "openai: "):
        with pytest.raises(ValueError, match="judge"):
            parse_judge_spec(bad)

    @register_judge("always_one")
    def one(prompt, response, reference):
        return 1.0

    assert make_judge("always_one").score(["p"], ["r"], ["x"]) == [1.0]
    with pytest.raises(JudgeError, match="--judge: judge 'nope': unknown"):
        make_judge("nope", label="--judge")


def test_the_config_checks_the_judge(tiny_config):
    raw = tiny_config("alright")
    ok = parse_config(
        {**raw, "eval": {"generate": True, "judge": "rm:./x", "retention_tasks": ["unitune_mc"]}}
    )
    assert ok.eval.generate_samples == 16 and ok.eval.max_new_tokens == 48
    for bad, where in (
        ({"judge": "nope"}, "eval: Value error, judge 'nope': unknown"),
        ({"judge": "demo", "judge_url": "http://x"}, "judge_url is for an openai:MODEL judge"),
        ({"judge": "openai:m", "judge_url": "ftp://x"}, "not an http(s) URL"),
        ({"generate_samples": 0}, "eval.generate_samples"),
    ):
        with pytest.raises(ConfigError, match=re.escape(where)):
            parse_config({**raw, "eval": bad})


# --------------------------------------------------------------------------------------------
# A stub reward model, built offline with hand-set weights


def stub_reward_model(path: Path, *, template: str | None = None) -> Path:
    """A 1-layer Llama sequence classifier whose layer adds nothing (zero output projections):
    the score is read from the last token's normalized embedding. " great" scores 2*sqrt(2),
    " good" 2, every other token 0."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    tok.chat_template = template  # none: the prompt and the response on separate lines
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        (great,) = tok(" great", add_special_tokens=False)["input_ids"]
        (good,) = tok(" good", add_special_tokens=False)["input_ids"]
        emb[great] = torch.tensor([0.0, 1.0] + [0.0] * 6)
        emb[good] = torch.tensor([1.0, 1.0] + [0.0] * 6)
        model.score.weight.zero_()
        model.score.weight[0, 1] = 1.0
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_reward_model_judge_and_its_ties(tmp_path):
    path = stub_reward_model(tmp_path / "rm")
    judge = make_judge(f"rm:{path}", device="cpu")
    assert judge.name == f"rm:{path}"
    scores = judge.score(["Q"] * 3, ["it is great", "it is good", "it is bad"], [""] * 3)
    assert scores == pytest.approx([2 * math.sqrt(2), 2.0, 0.0], abs=1e-4)
    responses = ["it is great", "it is good", "it is bad", "so so"]
    references = ["it is good", "it is good", "it is good", "meh"]
    result = win_rate(judge, ["Q"] * 4, responses, references)
    assert result.outcomes == (1.0, 0.5, 0.0, 0.5)
    assert (result.wins, result.ties, result.losses, result.win_rate) == (1, 2, 1, 0.5)


def test_reward_model_reads_its_own_chat_template(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %} great"
    path = stub_reward_model(tmp_path / "rm", template=template)
    judge = make_judge(f"rm:{path}", device="cpu")
    text, special = judge.text(PROMPT, "it is bad")
    assert text == f"<user>{PROMPT[0]['content']}<assistant>it is bad great"
    assert not special
    # the template ends every text in " great": all responses score alike, every one a tie
    result = win_rate(judge, [PROMPT] * 2, ["it is bad", "it is good"], ["it is great"] * 2)
    assert result.ties == 2


def test_reward_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        make_judge(f"rm:{tmp_path / 'missing'}")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text("{}")
    (pickles / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        make_judge(f"rm:{pickles}")
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.models.save import save_model

    model, tok = load_model(ModelConfig(name="builtin:tiny"))
    lm = save_model(model, tok, tmp_path / "lm")
    with pytest.raises(ModelLoadError, match="not a reward model .*LlamaForCausalLM"):
        make_judge(f"rm:{lm}")


# --------------------------------------------------------------------------------------------
# The OpenAI-compatible judge, against a local server


def test_openai_judge_request_auth_and_retries(monkeypatch, capsys, caplog):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    with JudgeServer(statuses=[500, 503]) as server:
        judge = make_judge(
            "openai:judge-model", url=server.url, key_env="MY_JUDGE_KEY", backoff=0.0, workers=1
        )
        result = win_rate(judge, [PROMPT] * 2, ["GOOD one", "GOOD two"], ["meh", "bah"])
    assert result.win_rate == 1.0 and result.wins == 2 and result.judge == "openai:judge-model"
    assert len(server.requests) == 2 + 4  # two 5xx answers retried, then 2 prompts x 2 orders
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {KEY}"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"][0]["role"] == "system"
    content = body["messages"][1]["content"]
    assert "[Response A]\nGOOD one" in content and "[Response B]\nmeh" in content
    assert PROMPT[0]["content"] in content
    # the reference-first order was asked too
    assert any("[Response A]\nmeh" in r["body"]["messages"][1]["content"] for r in server.requests)
    assert KEY not in repr(judge) + str(vars(judge))
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text


def test_openai_judge_errors_never_show_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})
    with JudgeServer(statuses=[401], error_body=echo) as server:
        judge = OpenAIJudge("m", base_url=server.url, backoff=0.0)
        with pytest.raises(JudgeError) as err:
            judge.prefer(["p"], ["a"], ["b"])
    text = str(err.value)
    assert "HTTP 401" in text and "***" in text and "$OPENAI_API_KEY" in text
    assert len(server.requests) == 1  # a refusal is not retried
    import traceback

    assert KEY not in "".join(traceback.format_exception(err.value))

    with JudgeServer(statuses=[500] * 5) as server:
        judge = OpenAIJudge("m", base_url=server.url, backoff=0.0, retries=2)
        with pytest.raises(JudgeError, match="failed 3 times; last: HTTP 500"):
            judge.prefer(["p"], ["a"], ["b"])
    assert len(server.requests) == 3


def test_openai_judge_timeouts_are_retried_and_unreachable_hosts_fail():
    with JudgeServer(delays=[1.5]) as server:
        judge = OpenAIJudge("m", base_url=server.url, timeout=0.3, backoff=0.0, workers=1)
        assert judge.prefer(["p"], ["GOOD"], ["b"]) == [1.0]
    assert len(server.requests) == 2
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = OpenAIJudge("m", base_url=url, backoff=0.0, retries=1)
    with pytest.raises(JudgeError, match="cannot be reached"):
        judge.check()
    with pytest.raises(JudgeError, match="failed 2 times"):
        judge.prefer(["p"], ["a"], ["b"])
    with pytest.raises(JudgeError, match="not an http"):
        OpenAIJudge("m", base_url="localhost:8000")
