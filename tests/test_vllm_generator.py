"""`online.generator: vllm` (models/vllm_generator.py) without a GPU.

What runs here: the weights the engine is given (checkpoint names, LoRA merged), the rows
built from vLLM's outputs, the start-up errors, and a whole online run through the same calls
unitune makes on vLLM's API, answered by `CpuVllm` below: an engine double that loads the
checkpoint with transformers, takes weights by name as vLLM's `load_weights` does (an unknown
name fails), frees its weights on `sleep(level=2)` (NaN: a generation on weights not pushed
again shows up in the log-probs) and decodes with unitune's own loop. What does not run here:
vLLM itself (it needs CUDA); README "Generation on a GPU: vLLM" says what was and was not run.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch
from test_architectures import perturb_adapters, save_tiny
from test_online import cli, online_config, records

from unitune.models import vllm_generator
from unitune.models.lora import merged_weights
from unitune.training.rollout import row_seed, sample

# ---------------------------------------------------------------------------- the weights


def test_merged_weights_are_the_merged_checkpoint(tmp_path):
    """With LoRA: the checkpoint's own names (what `save_pretrained` of the base writes), each
    weight equal to PEFT's `merge_and_unload`; the policy is left as it was (out of place)."""
    from safetensors.torch import load_file

    from unitune.models.config import LoraConfig, ModelConfig
    from unitune.models.load import load_model

    path = save_tiny("llama", tmp_path, tie_word_embeddings=True)
    saved = set(load_file(path / "model.safetensors"))
    model, _ = load_model(ModelConfig(name=str(path), lora=LoraConfig()))
    perturb_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dict(merged_weights(model))
    assert set(got) == saved and "lm_head.weight" not in saved  # tied: written once
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, w in got.items():
        torch.testing.assert_close(w, merged[name], rtol=1e-6, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj"
    base_q = before[f"base_model.model.{q}.base_layer.weight"]
    assert not torch.allclose(got[f"{q}.weight"], base_q)  # the adapters are in it
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    aliased = dict(merged_weights(model, aliases=True))
    assert set(aliased) == saved | {"lm_head.weight"}
    assert torch.equal(aliased["lm_head.weight"], aliased["model.embed_tokens.weight"])


def test_merged_weights_of_a_plain_model_are_its_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny("qwen2", tmp_path))
    got = dict(merged_weights(model))
    own = dict(model.named_parameters())
    assert list(got) == list(own)
    assert all(torch.equal(got[k], own[k]) for k in own)


# ---------------------------------------------------------------------------- vLLM's outputs


def _output(tokens: list[int], logps: list[float] | None):
    lps = None if logps is None else [{t: types.SimpleNamespace(logprob=lp, rank=1)}
                                      for t, lp in zip(tokens, logps, strict=True)]  # fmt: skip
    return types.SimpleNamespace(
        outputs=[types.SimpleNamespace(token_ids=tuple(tokens), logprobs=lps)]
    )


class ScriptedEngine:
    """Answers `generate` with fixed completions, recording what it was asked."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def generate(self, prompts, **kw):
        self.asked.append((prompts, kw))
        return vllm_generator.completions([_output(t, lp) for t, lp in self.answers])


def test_rows_from_vllm_completions():
    """EOS kept as the last target and nothing after it; a row cut at max_new_tokens and one
    stopped short without an EOS (vLLM's max_model_len) are truncated, each masked to its own
    tokens (never the padding); the sampler's log-probs are placed under their tokens; each row
    has its own seed, a function of the chunk's seed."""
    eos, pad = [2, 7], 0
    engine = ScriptedEngine([
        ([5, 6, 2], [-0.1, -0.2, -0.3]),      # ends at EOS 2
        ([5, 7], [-0.4, -0.5]),               # ends at the other EOS id
        ([5, 6, 8, 9], [-1.0, -1.0, -1.0, -1.0]),  # ran to max_new_tokens
        ([9], [-2.0]),                        # stopped short, no EOS (context full)
    ])  # fmt: skip
    r = sample(engine, [[11, 12], [13]], num_generations=2, eos=eos, pad_id=pad,
               max_new_tokens=4, generator="vllm", seed=3, temperature=0.7)  # fmt: skip
    assert r.completion_ids == [[5, 6, 2], [5, 7], [5, 6, 8, 9], [9]]
    assert r.truncated.tolist() == [False, False, True, True]
    assert r.mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert r.starts.tolist() == [2, 2, 1, 1]
    assert r.input_ids[3].tolist()[:2] == [13, 9] and r.attention_mask[3].sum() == 2
    torch.testing.assert_close(r.sample_logp[0], torch.tensor([-0.1, -0.2, -0.3, 0.0]))
    torch.testing.assert_close(r.sample_logp[3], torch.tensor([-2.0, 0.0, 0.0, 0.0]))
    prompts, kw = engine.asked[0]
    assert prompts == [[11, 12], [11, 12], [13], [13]]
    assert kw["seeds"] == [row_seed(3, i) for i in range(4)] and len(set(kw["seeds"])) == 4
    assert kw["temperature"] == 0.7 and kw["eos"] == eos and kw["max_new_tokens"] == 4
    with pytest.raises(RuntimeError, match="no log-prob"):
        vllm_generator.completions([_output([5, 6], None)])


# ---------------------------------------------------------------------------- start-up errors


def test_vllm_without_the_package_is_one_line_before_anything_loads(tiny_config, tmp_path):
    raw = online_config(tiny_config, ["length:4"], online={"generator": "vllm"})
    res = cli(tmp_path, raw)
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    if vllm_generator.importlib.util.find_spec("vllm") is None:
        assert len(lines) == 1 and "needs the vllm package" in lines[0], res.output
        assert "pip install 'unitune[vllm]'" in lines[0]
    assert "Traceback" not in res.output
    assert not Path(raw["output_dir"]).exists()


def test_vllm_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(vllm_generator.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "runs on a CUDA GPU" in vllm_generator.check_vllm()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_generator.check_vllm() is None


def test_vllm_options_without_the_vllm_generator_are_refused(tiny_config):
    from unitune.config import ConfigError, parse_config

    raw = online_config(tiny_config, ["length:4"], online={"vllm": {"sleep": True}})
    with pytest.raises(ConfigError, match="vllm: set, but online.generator is 'unitune'"):
        parse_config(raw)


# ---------------------------------------------------------------------------- a whole run


class CpuVllm:
    """vLLM's `LLM`, as far as unitune calls it, on the CPU (see the module docstring)."""

    made: list[CpuVllm] = []

    def __init__(self, model: str, **kw):
        from transformers import AutoModelForCausalLM

        self.kw, self.calls = kw, []
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
        worker = types.SimpleNamespace(model_runner=runner)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=worker)
        )
        CpuVllm.made.append(self)

    @torch.no_grad()
    def _load(self, weights):
        own = dict(self.hf.named_parameters())
        for name, w in weights:
            if name not in own:
                raise KeyError(f"vLLM has no weight {name!r}")
            own[name].copy_(w)
        self.calls.append("load")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    @torch.no_grad()
    def sleep(self, level: int):
        assert level == 2
        for p in self.hf.parameters():  # level 2 discards the weights
            p.fill_(float("nan"))
        self.calls.append("sleep")

    def wake_up(self, tags):
        self.calls.append(f"wake_up:{','.join(tags)}")

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm):
        from unitune.eval.generate import forked_rng
        from unitune.models.decode import decode

        self.calls.append("generate")
        outs = []
        for p, sp in zip(prompts, sampling_params, strict=True):
            ids = torch.tensor([p["prompt_token_ids"]])
            with forked_rng(torch.device("cpu"), sp.seed):
                out = decode(self.hf, ids, torch.ones_like(ids), max_new_tokens=sp.max_tokens,
                             eos=sp.stop_token_ids, pad_id=0, do_sample=sp.temperature > 0,
                             temperature=sp.temperature or 1.0, top_p=sp.top_p, top_k=sp.top_k,
                             logps=True, sampler="multinomial")  # fmt: skip
            toks, lps = out.tokens[0].tolist(), out.logp[0].tolist()
            ends = [i for i, t in enumerate(toks) if t in sp.stop_token_ids]
            n = ends[0] + 1 if ends else len(toks)
            outs.append(_output(toks[:n], lps[:n]))
        return outs


class Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture
def cpu_vllm(monkeypatch):
    """`import vllm` gives the CPU double; the start-up check passes."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = CpuVllm, Params
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr("unitune.training.engines.check_vllm", lambda: None)
    CpuVllm.made = []
    return CpuVllm


@pytest.mark.parametrize("variant", ["full", "lora", "sleep"])
def test_online_run_generates_with_vllm_synced_before_every_generation(
    variant, cpu_vllm, tiny_config, tmp_path
):
    """One engine per run, started from the run's checkpoint; before every generation batch and
    every held-out evaluation the policy's weights (LoRA merged) are pushed and the prefix cache
    reset, so the sampler's log-probs equal the training pass's at every step while the policy
    moves (a stale engine would drift; with sleep mode, a woken engine not pushed again would
    generate from freed weights)."""
    online = {"generator": "vllm"} | ({"vllm": {"sleep": True}} if variant == "sleep" else {})
    raw = online_config(tiny_config, ["length:4"], "una_online", max_steps=3, eval_every=3,
                        lr=5e-2 if variant == "lora" else 5e-3, online=online)  # fmt: skip
    if variant == "lora":
        raw["model"] = {"name": "builtin:tiny", "lora": {"r": 8}}
    res = cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    assert len(cpu_vllm.made) == 1
    engine = cpu_vllm.made[0]
    assert engine.kw["distributed_executor_backend"] == "external_launcher"
    assert engine.kw["logprobs_mode"] == "processed_logprobs"
    assert engine.kw["enable_sleep_mode"] is (variant == "sleep")
    steps = records(Path(raw["output_dir"]), "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["sampling/sampling_logp_difference/mean"] < 1e-4, r
    assert steps[-1]["kl"] > 1e-3  # the policy moved, and the engine with it
    calls = [c for c in engine.calls if c != "load"]
    gens = [i for i, c in enumerate(calls) if c == "generate"]
    assert gens, calls
    for i in gens:  # a generation follows a push (and its cache reset) or another generation
        j = i - 1
        while calls[j] == "generate":
            j -= 1
        assert calls[j] in ("reset_prefix_cache", "wake_up:kv_cache"), calls
    syncs = calls.count("reset_prefix_cache")
    assert syncs == len(records(Path(raw["output_dir"]), "eval")) + 3  # evals + generations
    if variant == "sleep":
        assert calls.count("sleep") == syncs + 1  # after start-up and after each use
        assert calls.count("wake_up:weights") == syncs


def test_a_stale_engine_shows_in_the_gap_and_is_warned_about(
    cpu_vllm, tiny_config, tmp_path, monkeypatch
):
    """The control for the test above: an engine given the weights only once (TRL #5312's
    bug) drifts from the policy, the gap grows past `max_logp_difference` and the run warns."""
    from unitune.models.vllm_generator import VllmGenerator

    real = VllmGenerator.sync

    def once(self, weights):
        if getattr(self, "pushed", False):
            self.llm.reset_prefix_cache()
            return 0
        self.pushed = True
        return real(self, weights)

    monkeypatch.setattr(VllmGenerator, "sync", once)
    online = {"generator": "vllm", "max_logp_difference": 1e-3}
    raw = online_config(tiny_config, ["length:4"], "una_online", max_steps=3, eval_every=3,
                        lr=5e-3, online=online)  # fmt: skip
    res = cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    gaps = [r["sampling/sampling_logp_difference/mean"]
            for r in records(Path(raw["output_dir"]), "train")]  # fmt: skip
    assert gaps[0] < 1e-4 < 1e-3 < gaps[-1], gaps
    assert res.output.count("the sampler's log-probs differ") == 1
