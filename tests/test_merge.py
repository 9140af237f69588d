"""`unitune merge`: the methods on hand-made tensors, and whole merges of builtin:tiny variants."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import MergeConfig, MergeOptions
from unitune.merging import merge as merge_mod
from unitune.merging.errors import MergeError
from unitune.merging.merge import merge
from unitune.merging.methods import combine, dare_drop, dare_mask, trim
from unitune.merging.sparsity import DeltaStats, delta_sparsity
from unitune.models.builtin import BUILTIN_TINY, load_tiny
from unitune.models.source import model_dir

# --------------------------------------------------------------------------------------------
# Helpers and fixtures


def write_model(path: Path, tensors: dict[str, torch.Tensor], like: Path) -> Path:
    """A full model directory: the tensors as safetensors plus `like`'s config.json."""
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(like / "config.json", path / "config.json")
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def config(out: Path, models: list, **opts) -> MergeConfig:
    sources = [m if isinstance(m, dict) else {"path": str(m)} for m in models]
    return MergeConfig(base=BUILTIN_TINY, models=sources, output=str(out), **opts)


def no_leftovers(out: Path) -> bool:
    """No output directory and no temporary siblings (atomic_dir's `.NAME.tmp-*`)."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def tiny() -> dict:
    base = model_dir(BUILTIN_TINY)
    return {"dir": base, "tensors": load_file(str(base / "model.safetensors"))}


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, Path]:
    """Two fine-tuned variants of builtin:tiny: every tensor plus small Gaussian noise."""
    root = tmp_path_factory.mktemp("finetuned")
    out = {}
    for i in range(2):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in tiny["tensors"].items()
        }
        out[f"m{i}"] = write_model(root / f"m{i}", tensors, tiny["dir"])
    return out


# --------------------------------------------------------------------------------------------
# The methods on hand-made tensors

D1 = torch.tensor([1.0, -3.0, 3.0, 0.0, 1.0, 0.0, 1.0])
D2 = torch.tensor([2.0, 1.0, -1.0, 0.0, 1.0, 0.0, -0.5])
D3 = torch.tensor([-4.0, 1.0, -1.0, 0.0, 1.0, -2.0, 0.0])
W = [1.0, 2.0, 0.5]
# u = w * d per entry:                 elected sign, agreeing u
# 0: ( 1,  4, -2)   sum  3  -> +, {1, 4}:    count 5/2,   weight 5/(1+2)
# 1: (-3,  2, .5)   sum -.5 -> -, {-3}:      count -3,    weight -3/1
# 2: ( 3, -2, -.5)  sum .5  -> +, {3}:       count 3,     weight 3/1
# 3: all zero               -> 0
# 4: ( 1,  2, .5)   sum 3.5 -> +, all three: count 3.5/3, weight 3.5/3.5
# 5: ( 0,  0, -1)   sum -1  -> -, {-1}:      count -1,    weight -1/.5
# 6: ( 1, -1,  0)   sum 0   -> no sign elected: 0
TIES_COUNT = [5 / 2, -3.0, 3.0, 0.0, 3.5 / 3, -1.0, 0.0]
TIES_WEIGHT = [5 / 3, -3.0, 3.0, 0.0, 1.0, -2.0, 0.0]


@pytest.mark.parametrize(
    ("normalize", "expected"), [("count", TIES_COUNT), ("weight", TIES_WEIGHT)]
)
def test_ties_sign_election_and_disjoint_mean(normalize, expected):
    opts = MergeOptions(method="ties", density=1.0, normalize=normalize)
    got = combine([D1, D2, D3], W, opts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_ties_trims_to_the_top_density_magnitudes():
    d = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.05, 3.0, -0.01, 0.7, 2.0])
    assert trim(d, 0.3).tolist() == [0, -5.0, 0, 4.0, 0, 0, 3.0, 0, 0, 0]
    assert trim(d, 0.05).tolist() == [0, -5.0] + [0] * 8  # at least one entry is kept
    assert torch.equal(trim(d, 1.0), d)
    # one model, weight 1: TIES returns its trimmed delta; at density 1, the delta itself
    opts = MergeOptions(method="ties", density=0.3)
    assert torch.equal(combine([d], [1.0], opts), trim(d, 0.3))
    assert torch.equal(combine([d], [1.0], opts, densities=[1.0]), d)
    # per-model densities override the global one; then sign election as usual
    e = torch.tensor([1.0, 1.0, -1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    got = combine([d, e], [1.0, 1.0], opts, densities=[0.2, 0.2])
    # kept: d -> {-5 at 1, 4 at 3}; e -> {-2 at 3, 1 at 0 (ties at the cut: lowest index)}
    assert got.tolist() == [1.0, -5.0, 0, 4.0, 0, 0, 0, 0, 0, 0]
    assert trim(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]), 0.4).tolist() == [1.0, -1.0, 0, 0, 0]


def test_task_arithmetic_is_the_weighted_sum():
    opts = MergeOptions(method="task_arithmetic")
    got = combine([D1, D2, D3], W, opts)
    torch.testing.assert_close(got, D1 + 2 * D2 + 0.5 * D3)
    assert torch.equal(D1, torch.tensor([1.0, -3.0, 3.0, 0.0, 1.0, 0.0, 1.0]))  # inputs untouched


def test_dare_is_reproducible_and_depends_on_seed_name_and_model():
    d = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    opts = MergeOptions(method="dare_linear", drop_rate=0.5, seed=3)
    a = combine([d], [1.0], opts, name="layer.weight")
    combine([d], [1.0], opts, name="other.weight")  # other tensors in between change nothing
    assert torch.equal(a, combine([d], [1.0], opts, name="layer.weight"))
    other_seed = opts.model_copy(update={"seed": 4})
    assert not torch.equal(a, combine([d], [1.0], other_seed, name="layer.weight"))
    assert not torch.equal(a, combine([d], [1.0], opts, name="layer.bias"))
    m0 = dare_mask(d.shape, 0.5, seed=3, name="layer.weight", index=0)
    m1 = dare_mask(d.shape, 0.5, seed=3, name="layer.weight", index=1)
    assert not torch.equal(m0, m1)  # each model gets its own mask
    # survivors are rescaled by 1 / (1 - p), the rest are zero
    torch.testing.assert_close(a, torch.where(m0, d * 2.0, 0.0))


def test_dare_keeps_the_expected_delta():
    p = 0.3
    gen = torch.Generator().manual_seed(1)
    # one large tensor: sum(dropped) - sum(d) has variance sum(d^2) p / (1 - p)
    d = torch.randn(200_000, generator=gen)
    out = dare_drop(d, p, seed=0, name="w", index=0)
    sd = math.sqrt(float((d.double() ** 2).sum()) * p / (1 - p))
    assert abs(float(out.double().sum() - d.double().sum())) < 5 * sd
    kept = float((out != 0).double().mean())
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / d.numel())
    # per entry: the mean over many seeds approaches the delta
    small = torch.randn(50, generator=gen)
    n = 2000
    mean = sum(dare_drop(small, p, seed=s, name="w", index=0) for s in range(n)) / n
    tol = 5 * small.abs() * math.sqrt(p / (1 - p) / n)
    assert ((mean - small).abs() <= tol).all()
    # dare_ties at one model: the dropped, rescaled delta
    opts = MergeOptions(method="dare_ties", drop_rate=p, seed=0)
    torch.testing.assert_close(combine([d], [1.0], opts, name="w"), out)


def test_combine_checks_its_arguments():
    with pytest.raises(ValueError, match="weights"):
        combine([D1, D2], [1.0], MergeOptions())
    with pytest.raises(ValueError, match="densities"):
        combine([D1, D2], [1.0, 1.0], MergeOptions(), densities=[0.5])


def test_delta_stats_top10_mass_is_within_the_documented_bound():
    gen = torch.Generator().manual_seed(2)
    parts = [torch.randn(100_003, generator=gen) * 0.01, torch.randn(7, 9, generator=gen).exp()]
    stats = DeltaStats(tol=1e-6)
    for t in parts:
        stats.update(t, t.numel())
    stats.update(None, 5000)
    a = torch.cat([t.reshape(-1).abs() for t in parts] + [torch.zeros(5000)])
    a = a.double().sort(descending=True).values
    exact = float(a[: math.ceil(0.1 * a.numel())].sum() / a.sum())
    r = stats.report()
    assert r["numel"] == a.numel()
    assert r["zeros"] == int((a <= 1e-6).sum())
    assert r["l1"] == pytest.approx(float(a.sum()), rel=1e-9)
    assert r["top10_mass"] == pytest.approx(exact, rel=2**-12)


# --------------------------------------------------------------------------------------------
# Whole merges


def test_task_arithmetic_weight_one_gives_the_model_back(tiny, models, tmp_path):
    report = merge(
        config(tmp_path / "out", [models["m0"]], method="task_arithmetic"), progress=False
    )
    got = load_dir(tmp_path / "out")
    want = load_file(str(models["m0"] / "model.safetensors"))
    assert set(got) == set(want)
    for name, t in want.items():
        # base + (theta - base) in float32: equal up to one rounding
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6)
        assert not torch.allclose(got[name], tiny["tensors"][name], rtol=0, atol=1e-4)
    assert report["tensors"] == len(want)
    assert report["parameters"] == sum(t.numel() for t in want.values())
    saved = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert saved["report"]["method"] == "task_arithmetic"
    assert saved["config"]["models"][0]["path"] == str(models["m0"])
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).is_file(), f
    # the streamed file is byte for byte what the safetensors library writes (header included)
    save_file(got, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    written = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "ref.safetensors").read_bytes()


def test_merged_directory_loads_in_transformers_like_an_in_memory_merge(tiny, models, tmp_path):
    from transformers import AutoModelForCausalLM

    sources = [
        {"path": str(models["m0"]), "density": 0.7},
        {"path": str(models["m1"]), "weight": 0.6},
    ]
    cfg = config(tmp_path / "out", sources, method="ties", density=0.4, normalize="weight")
    report = merge(cfg, progress=False)

    # the same merge in memory, tensor by tensor with `combine`, loaded into the base model
    base = tiny["tensors"]
    finetuned = [load_file(str(models[m] / "model.safetensors")) for m in ("m0", "m1")]
    ref = AutoModelForCausalLM.from_pretrained(str(tiny["dir"]))
    with torch.no_grad():
        for name, param in ref.named_parameters():
            deltas = [f[name] - base[name] for f in finetuned]
            param.copy_(
                base[name] + combine(deltas, [1.0, 0.6], cfg, densities=[0.7, 0.4], name=name)
            )
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, ref(ids).logits)
        assert not torch.equal(merged(ids).logits, AutoModelForCausalLM.from_pretrained(
            str(tiny["dir"]))(ids).logits)  # fmt: skip

    # the report's sparsity figures are those of delta_sparsity
    for i, m in enumerate(("m0", "m1")):
        assert report["models"][i] == {
            "path": str(models[m]),
            "kind": "full",
            "weight": [1.0, 0.6][i],
            **delta_sparsity(BUILTIN_TINY, models[m]),
        }


def test_sharded_output_has_a_correct_index_and_loads(models, tmp_path):
    from transformers import AutoModelForCausalLM

    one = merge(config(tmp_path / "one", [models["m0"], models["m1"]], method="dare_ties"),
                progress=False)  # fmt: skip
    cfg = config(tmp_path / "many", [models["m0"], models["m1"]], method="dare_ties")
    cfg.max_shard_gb = 50e-6  # 50 kB: a few small tensors per shard, the embedding alone
    report = merge(cfg, progress=False)
    out = tmp_path / "many"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert report["shards"] == len(files) > 3
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = {}
    for f in files:
        part = load_file(str(out / f))
        assert all(index["weight_map"][k] == f for k in part)
        assert sum(t.nbytes for t in part.values()) <= 50_000 or len(part) == 1
        tensors.update(part)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    single = load_dir(tmp_path / "one")
    assert set(tensors) == set(single) and all(torch.equal(tensors[k], single[k]) for k in single)
    assert one["output_bytes"] == (tmp_path / "one" / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.model.norm.weight.detach(), single["model.norm.weight"])


def test_output_dtype(models, tmp_path):
    from transformers import AutoModelForCausalLM

    merge(config(tmp_path / "out", [models["m0"]], method="task_arithmetic", dtype="bfloat16"),
          progress=False)  # fmt: skip
    got = load_dir(tmp_path / "out")
    want = load_file(str(models["m0"] / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    torch.testing.assert_close(got["model.norm.weight"], want["model.norm.weight"].bfloat16())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# LoRA adapters


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A peft LoRA adapter on builtin:tiny (rsLoRA, rank and alpha patterns, an embedding LoRA
    and a modules_to_save tensor) with random weights, and peft's own merge_and_unload of it."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_tiny(torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["model.norm"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
    )
    path = tmp_path_factory.mktemp("lora") / "adapter"
    with warnings.catch_warnings():  # peft on LoRA of a tied embedding; transformers 5 deprecations
        warnings.filterwarnings("ignore", ".*tie_word_embeddings.*", UserWarning)
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        peft_model = get_peft_model(model, cfg)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(str(path), save_embedding_layers=False)
        merged = peft_model.merge_and_unload()
    return path, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_merged_lora_equals_peft_merge_and_unload(tiny, lora, tmp_path):
    adapter, want = lora
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert (
        any("lora_embedding_A" in k for k in keys) and "base_model.model.model.norm.weight" in keys
    )
    report = merge(config(tmp_path / "out", [adapter], method="task_arithmetic"), progress=False)
    got = load_dir(tmp_path / "out")
    changed = 0
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(t, tiny["tensors"][name])
    assert changed == 2 * 3 + 2  # q, v, down in two layers, the embedding, the final norm
    assert report["models"][0]["kind"] == "lora"
    # the adapter's delta touches only its targets: everything else counts as zero
    stats = delta_sparsity(BUILTIN_TINY, adapter, tol=0.0)
    touched = sum(tiny["tensors"][n].numel() for n, t in got.items()
                  if not torch.equal(t, tiny["tensors"][n]))  # fmt: skip
    assert stats["numel"] - stats["zeros"] == touched


def test_lora_adapter_errors(tiny, lora, tmp_path):
    adapter, _ = lora
    weights = load_file(str(adapter / "adapter_model.safetensors"))

    def variant(name: str, tensors: dict | None = None, **cfg_update) -> Path:
        path = tmp_path / name
        shutil.copytree(adapter, path)
        if tensors is not None:
            save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, **cfg_update}))
        return path

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    renamed = {
        k.replace("q_proj", "x_proj") if k.startswith(q) else k: v for k, v in weights.items()
    }
    wrong = {**weights, f"{q}.lora_A.weight": torch.zeros(4, 32)}
    cases = [
        (
            variant("absent", renamed),
            ["model.layers.0.self_attn.x_proj.weight", "absent", "base ("],
        ),
        (
            variant("shape", wrong),
            ["model.layers.0.self_attn.q_proj.weight", "[64, 64]", "[64, 32]"],
        ),
        (variant("dora", use_dora=True), ["DoRA"]),
        (variant("ia3", peft_type="IA3"), ["IA3", "only LoRA"]),
    ]
    for path, needles in cases:
        out = tmp_path / f"out-{path.name}"
        with pytest.raises(MergeError) as err:
            merge(config(out, [path]), progress=False)
        for needle in needles:
            assert needle in str(err.value), (needle, str(err.value))
        assert no_leftovers(out)


# --------------------------------------------------------------------------------------------
# Errors: checked before anything is written


@pytest.fixture(scope="module")
def broken(tiny, models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    good = load_file(str(models["m0"] / "model.safetensors"))
    up = "model.layers.0.mlp.up_proj.weight"
    out = {
        "missing": write_model(root / "missing", {k: v for k, v in good.items()
                                                  if k != "model.norm.weight"}, tiny["dir"]),
        "extra": write_model(root / "extra", {**good, "extra.weight": torch.zeros(3)}, tiny["dir"]),
        "shape": write_model(root / "shape", {**good, up: torch.zeros(128, 32)}, tiny["dir"]),
        "dtype": write_model(root / "dtype", {**good, "model.norm.weight": good[
            "model.norm.weight"].half()}, tiny["dir"]),
    }  # fmt: skip
    arch = shutil.copytree(models["m0"], root / "arch")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    out["arch"] = arch
    pickle = root / "pickle"
    pickle.mkdir()
    shutil.copy(tiny["dir"] / "config.json", pickle / "config.json")
    (pickle / "pytorch_model.bin").write_bytes(b"not loaded")
    out["pickle"] = pickle
    return out


ERRORS = {
    "arch": ["architecture mismatch", "num_hidden_layers", "2", "3"],
    "missing": ["'model.norm.weight'", "missing from models[1]"],
    "extra": ["'extra.weight'", "not in base"],
    "shape": ["'model.layers.0.mlp.up_proj.weight'", "[128, 64]", "[128, 32]"],
    "dtype": ["'model.norm.weight'", "F32", "F16"],
    "pickle": ["pytorch_model.bin", "pickle", "models[1]"],
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_inputs_fail_naming_the_tensor_and_both_sources(tiny, models, broken, case, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeError) as err:
        merge(config(out, [models["m1"], broken[case]]), progress=False)
    msg = str(err.value)
    for needle in ERRORS[case]:
        assert needle in msg, (needle, msg)
    assert str(broken[case]) in msg
    if case != "pickle":  # the pickle error is about one directory only
        assert f"base ({tiny['dir']})" in msg
    assert no_leftovers(out)


def test_a_failing_merge_leaves_a_previous_output_intact(models, broken, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    with pytest.raises(MergeError):  # at validation
        merge(config(out, [broken["shape"]]), progress=False)
    assert (out / "previous.txt").read_text() == "keep me"

    calls = []

    def failing(*args, **kwargs):  # fails half-way through writing
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return combine(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "combine_owned", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge(config(out, [models["m0"]]), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        calls.clear()
        merge(config(tmp_path / "new", [models["m0"]]), progress=False)
    assert no_leftovers(tmp_path / "new")


def test_the_output_cannot_be_an_input(models):
    with pytest.raises(MergeError, match="is an input"):
        merge(config(models["m0"], [models["m0"]]), progress=False)


# --------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_merge_end_to_end(models, tmp_path):
    raw = {
        "base": BUILTIN_TINY,
        "models": [{"path": str(models["m0"]), "weight": 0.7}, {"path": str(models["m1"])}],
        "method": "ties",
        "density": 0.5,
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["merge", str(path), "--set", "normalize=weight", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "ties" in res.output and "models[1]" in res.output and "sparsity" in res.output
    saved = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert saved["config"]["normalize"] == "weight"
    assert saved["config"]["models"][0]["weight"] == 0.7

    raw["dnsity"] = 0.3
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["merge", str(path)])
    assert res.exit_code == 2
    assert "dnsity: unknown key" in res.output

    del raw["dnsity"]
    raw["models"].append({"path": str(tmp_path / "nowhere")})
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["merge", str(path)])
    assert res.exit_code == 2
    assert "does not exist" in res.output
