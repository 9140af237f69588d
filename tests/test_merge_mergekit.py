"""Agreement with mergekit (a test-only dependency): the same merges of the same small models.

mergekit 0.1.5 runs on transformers 5 and merges builtin:tiny (a small Llama) as it is. Both
sides compute in float32; the outputs are compared tensor by tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("mergekit", reason="mergekit is a test-only dependency (pip install mergekit)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import generalized_task_arithmetic as gta  # noqa: E402
from mergekit.options import MergeOptions as MergekitOptions  # noqa: E402
from mergekit.sparsify import rescaled_masked_tensor  # noqa: E402

from unitune.config import MergeConfig  # noqa: E402
from unitune.merging.merge import merge  # noqa: E402
from unitune.merging.methods import dare_mask  # noqa: E402
from unitune.models.builtin import BUILTIN_TINY  # noqa: E402
from unitune.models.source import model_dir  # noqa: E402

WEIGHTS = [1.0, 0.5, 0.8]
DENSITIES = [0.5, 0.3, 0.7]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    """builtin:tiny and three variants with noise of different scales (so signs conflict)."""
    base = model_dir(BUILTIN_TINY)
    tensors = load_file(str(base / "model.safetensors"))
    root = tmp_path_factory.mktemp("mergekit_inputs")
    models = []
    for i, scale in enumerate((0.01, 0.02, 0.005)):
        gen = torch.Generator().manual_seed(200 + i)
        path = root / f"m{i}"
        path.mkdir()
        noisy = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        save_file(noisy, str(path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", path / "config.json")
        models.append(path)
    return base, models


def run_both(inputs, tmp_path, method: str, ours: dict, theirs: dict, weights, densities):
    base, models = inputs
    # mergekit's density is TIES's kept fraction and DARE's keep probability; ours is TIES's only
    sources = [
        {"path": str(m), "weight": w, **({"density": d} if method == "ties" else {})}
        for m, w, d in zip(models, weights, densities, strict=True)
    ]
    merge(MergeConfig(base=BUILTIN_TINY, models=sources, output=str(tmp_path / "ours"),
                      method=method, **ours), progress=False)  # fmt: skip
    mk_models = []
    for m, w, d in zip(models, weights, densities, strict=True):
        params = {"weight": w, **({"density": d} if d is not None else {})}
        mk_models.append({"model": str(m), "parameters": params})
    mk = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "parameters": theirs,
        "models": mk_models,
    }
    run_merge(
        MergeConfiguration.model_validate(mk),
        str(tmp_path / "mergekit"),
        MergekitOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    a, b = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mergekit")
    assert set(a) == set(b)
    base_tensors = load_file(str(base / "model.safetensors"))
    finetuned = [load_file(str(m / "model.safetensors")) for m in models]
    for name in a:
        differ = ~torch.isclose(a[name], b[name], rtol=0, atol=1e-6)
        if method == "ties":  # which of equal magnitudes straddling the cut is kept is arbitrary
            deltas = [f[name] - base_tensors[name] for f in finetuned]
            differ &= ~trim_ties(deltas, densities)
        assert not differ.any(), f"{name}: {int(differ.sum())} entries differ"
        assert not torch.equal(a[name], base_tensors[name])


def trim_ties(deltas: list[torch.Tensor], densities: list[float]) -> torch.Tensor:
    """Entries whose |delta| equals a model's TIES cut-off value while more entries share that
    value than the cut keeps: there the two implementations' sorts may keep different ones."""
    out = torch.zeros_like(deltas[0], dtype=torch.bool)
    for d, density in zip(deltas, densities, strict=True):
        a = d.abs()
        k = max(1, int(density * a.numel()))
        if k >= a.numel():
            continue
        ranked = a.reshape(-1).sort(descending=True).values
        cut = ranked[k - 1]
        if int((a == cut).sum()) > int((ranked[:k] == cut).sum()):
            out |= a == cut
    return out


def test_task_arithmetic_matches_mergekit(inputs, tmp_path):
    run_both(inputs, tmp_path, "task_arithmetic", {}, {}, WEIGHTS, [None] * 3)


def test_ties_weight_normalize_matches_mergekit_normalize_true(inputs, tmp_path):
    """normalize="weight" is mergekit's `normalize: true`: the disjoint sum of the weighted
    deltas divided by the sum of the agreeing models' weights; unequal weights and per-model
    densities."""
    run_both(inputs, tmp_path, "ties", {"normalize": "weight"}, {"normalize": True},
             WEIGHTS, DENSITIES)  # fmt: skip


def test_ties_count_normalize_matches_mergekit_at_unit_weights(inputs, tmp_path):
    """normalize="count" (the TIES paper's disjoint mean) equals mergekit's `normalize: true`
    when every weight is 1; the global density applies to every model."""
    run_both(inputs, tmp_path, "ties", {"normalize": "count", "density": 0.4},
             {"normalize": True}, [1.0] * 3, [0.4] * 3)  # fmt: skip


@pytest.mark.parametrize(("method", "ours", "theirs"), [
    ("dare_ties", {"normalize": "weight"}, {"normalize": True, "rescale": False}),
    ("dare_linear", {}, {"rescale": False}),
])  # fmt: skip
def test_dare_matches_mergekit_given_the_same_masks(inputs, tmp_path, monkeypatch, method, ours,
                                                    theirs):  # fmt: skip
    """DARE given the same drop masks.

    The masks come from different RNGs (ours: `dare_mask`, seeded by seed, tensor name and model
    index; mergekit: `torch.bernoulli` on the global RNG), so mergekit's sparsification is patched
    to draw its mask from `dare_mask` for the same tensor and model. Its rescaling is replaced
    too: mergekit 0.1.5 rescales DARE's survivors to keep the delta's L1 norm (`rescale: true`,
    `RescaleNorm.l1`) or not at all, while the DARE paper and unitune divide by `1 - drop_rate`;
    the patch masks with mergekit's own `rescaled_masked_tensor` (no norm) and divides by its
    density (= 1 - drop_rate). So this checks mergekit's weighting, sign election (dare_ties) and
    normalisation on the same dropped deltas; the drop itself is checked in test_merge.py.
    """
    drop, seed = 0.3, 11
    base, models = inputs
    index = {str(m): i for i, m in enumerate(models)}
    current: dict = {}
    original = gta.GeneralizedTaskArithmeticMerge.merge_group

    def merge_group(self, group, /, **parameters):
        current["name"] = group.metadata.name
        current["models"] = [index[str(e.id.model.path)] for e in group.non_base]
        return original(self, group, **parameters)

    def sparsify(tensor, density, method, rescale_norm=None, **_):
        assert density == pytest.approx(1 - drop) and rescale_norm is None
        keep = dare_mask(tensor.shape, drop, seed=seed, name=current["name"],
                         index=current["models"].pop(0))  # fmt: skip
        return rescaled_masked_tensor(tensor, keep.to(tensor.dtype), None) / density

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", merge_group)
    monkeypatch.setattr(gta, "sparsify", sparsify)
    run_both(inputs, tmp_path, method, {"drop_rate": drop, "seed": seed, **ours}, theirs,
             WEIGHTS, [1 - drop] * 3)  # fmt: skip
