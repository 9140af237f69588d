"""A merge method is one function and one line of `METHODS`: a method registered inside the test
merges builtin:tiny variants through `unitune merge`, and an unknown one is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from unitune.cli import app
from unitune.config import MergeOptions
from unitune.merging.methods import METHODS, Method, keep
from unitune.models.builtin import BUILTIN_TINY
from unitune.models.source import model_dir


def sign_mean(ds: list[torch.Tensor], weights: list[float], opts: MergeOptions) -> torch.Tensor:
    """A toy consensus: the weighted mean of the deltas' signs, `sum_i w_i sign(d_i) / n`."""
    out = torch.zeros_like(ds[0])
    for w, d in zip(weights, ds, strict=True):
        out.add_(torch.sign(d), alpha=w)
    return out.div_(len(ds))


@pytest.fixture
def variants(tmp_path) -> tuple[Path, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = model_dir(BUILTIN_TINY)
    tensors = load_file(str(base / "model.safetensors"))
    out = []
    for i in range(2):
        gen = torch.Generator().manual_seed(7 + i)
        t = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        path = tmp_path / f"m{i}"
        path.mkdir()
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", path / "config.json")
        out.append(t)
    return base, tensors, out


def test_a_method_registered_in_the_test_merges_with_its_own_numbers(
    variants, tmp_path, monkeypatch
):
    monkeypatch.setitem(METHODS, "sign_mean", Method(keep, sign_mean))  # the one registry line
    _, base, models = variants
    cfg = {
        "base": BUILTIN_TINY,
        "models": [
            {"path": str(tmp_path / "m0"), "weight": 1.0},
            {"path": str(tmp_path / "m1"), "weight": 0.5},
        ],  # fmt: skip
        "output": str(tmp_path / "out"),
        "method": "sign_mean",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["merge", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(base)
    for name, b in base.items():
        d0, d1 = models[0][name] - b, models[1][name] - b
        want = b + (torch.sign(d0) + 0.5 * torch.sign(d1)) / 2
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_an_unknown_method_is_one_line_before_anything_is_written(variants, tmp_path):
    cfg = {
        "base": BUILTIN_TINY,
        "models": [{"path": str(tmp_path / "m0")}],
        "output": str(tmp_path / "out"),
        "method": "tie",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["merge", str(path), "--no-progress"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "method 'tie': unknown; known: task_arithmetic, ties, dare_linear, dare_ties" in (
        " ".join(result.output.split())
    )
    assert not (tmp_path / "out").exists()


def test_a_parallel_run_with_an_unknown_method_stops_before_training(tiny_config, tmp_path):
    raw = tiny_config("parallel")
    raw["parallel"] = {"merge": {"method": "tie"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "method 'tie': unknown; known: task_arithmetic" in " ".join(result.output.split())
    assert not Path(raw["output_dir"]).exists()  # no branch trained, nothing written
