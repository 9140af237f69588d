"""What the held-out figures and the ideal point measure: the same quantity in every run
(`eval.beta`), and MAXRIGHT's gaps in the objectives' own losses (docs/methods.md, "Metrics")."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, write_jsonl
from rich.console import Console

from unitune.config import ConfigError, parse_config
from unitune.eval.heldout import feedback_metrics
from unitune.jobs import train
from unitune.objectives import SeqLogps
from unitune.study.plots import plot_runs
from unitune.training.calibration import calibrate


def evals_of(cfg) -> list[dict]:
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").open()]
    return [r for r in rows if r["type"] == "eval"]


@pytest.mark.parametrize(
    ("sft", "pref"), [("sft", "ipo"), ("sft", "simpo"), ("uft", "dpo"), ("minor_sft", "dpo")]
)
def test_maxright_with_calibrated_optima_steps_on_both_objectives(tiny_config, sft, pref):
    """IPO's loss is ~25 at the start, UFT's ~0.25: compared with optima of f_sft / f_pref, one
    gap would always win. With optima of the objectives' own losses both objectives get steps."""
    raw = tiny_config("maxright", max_steps=12, eval_every=12)
    raw["objectives"] = {"sft": {"name": sft}, "pref": {"name": pref}}
    raw["schedule"] |= {"ideal": "calibrate", "calibration_steps": 4}
    summary = train(parse_config(raw), progress=False)
    cfg = parse_config(raw)
    own_sft, own_pref = cfg.own_loss_key("sft"), cfg.own_loss_key("pref")
    assert own_sft == ("f_sft" if sft == "sft" else f"loss_{sft}")
    assert own_pref == ("f_pref" if pref == "dpo" else f"loss_{pref}")
    assert summary["steps"]["sft"] > 0 and summary["steps"]["pref"] > 0, summary["steps"]
    # the optima are the calibration runs' best held-out values of those own losses
    calib = Path(raw["cache_dir"]) / "calibration"
    for slot, key in (("sft", own_sft), ("pref", own_pref)):
        (sub,) = calib.glob(f"*-{slot}")
        best = min(e[key] for e in evals_of(parse_config({**raw, "output_dir": str(sub)})))
        assert summary[f"loss_{slot}_star"] == best


def test_maxright_with_a_configured_ideal_needs_the_own_loss_optimum(tiny_config):
    raw = tiny_config("maxright")
    raw["objectives"] = {"pref": {"name": "ipo"}}
    raw["schedule"] |= {"ideal": "config", "f_sft_star": 1.0, "f_pref_star": 0.1}
    with pytest.raises(ConfigError, match="loss_pref_star.*ipo"):
        parse_config(raw)
    raw["schedule"]["loss_pref_star"] = 2.0
    assert parse_config(raw).schedule.loss_pref_star == 2.0
    raw["objectives"] = {"pref": {"name": "dpo"}}  # its own loss is f_pref: f* serves
    del raw["schedule"]["loss_pref_star"]
    parse_config(raw)


@pytest.mark.parametrize(("name", "params"), [("simpo", {}), ("dpo", {"beta": 0.5})])
def test_f_pref_is_dpo_at_eval_beta_whatever_the_objective(tiny_config, name, params):
    """SimPO's beta = 2.0 (or DPO at beta 0.5) trains; f_pref, the reward margin and the plot's
    axis stay DPO at eval.beta, so these runs compare with a plain DPO run."""
    runs = []
    for pref, extra in (("dpo", {}), (name, params)):
        raw = tiny_config("mix", max_steps=2, eval_every=2)
        raw["objectives"] = {"pref": {"name": pref, **extra}}
        raw["output_dir"] += f"-{pref}"
        cfg = parse_config(raw)
        summary = train(cfg, progress=False)
        runs.append(cfg.output_dir)
        start, end = evals_of(cfg)[0], evals_of(cfg)[-1]
        assert start["f_pref"] == pytest.approx(math.log(2), abs=1e-6)
        assert summary["measures"]["f_pref"] == "held-out DPO loss (\u03b2=0.1)"
        assert ("loss_dpo" in end) == (pref == "dpo" and extra != {})
        if pref != "dpo":
            assert f"loss_{pref}" in end
    # reward margin at eval.beta = 0.1: beta * mean(r_w - r_l), consistent with f_pref's beta
    svg = plot_runs([Path(r) for r in runs], Path(runs[0]) / "plot")[1].read_text()
    assert "f_pref: held-out DPO loss (\u03b2=0.1)" in svg


def test_eval_beta_sets_the_measure_and_plots_refuse_to_mix_measures(tiny_config):
    dirs = []
    for beta in (0.1, 0.5):
        raw = tiny_config("mix", max_steps=2, eval_every=2)
        raw["eval"] = {"beta": beta}
        raw["output_dir"] += f"-{beta}"
        cfg = parse_config(raw)
        summary = train(cfg, progress=False)
        dirs.append(Path(cfg.output_dir))
        assert summary["measures"]["f_pref"] == f"held-out DPO loss (\u03b2={beta:g})"
        # at pi = pi_ref: margin 0, f_pref log 2, for any beta; after training the margin is
        # beta times the mean log-ratio difference, so it scales with eval.beta
        assert evals_of(cfg)[0]["reward_margin"] == 0.0
    with pytest.raises(ValueError, match="measure f_pref differently"):
        plot_runs(dirs, dirs[0] / "plot")


def test_unpaired_f_pref_is_the_logistic_loss_at_eval_beta():
    r = torch.tensor([1.0, -2.0, 0.5, 3.0])
    good = torch.tensor([True, False, False, True])
    out = feedback_metrics(SeqLogps(r, torch.ones(4), torch.zeros(4)), good, beta=0.5)
    s = [1, -1, -1, 1]
    want = (
        sum(math.log1p(math.exp(-si * 0.5 * ri)) for si, ri in zip(s, r.tolist(), strict=True)) / 4
    )
    assert out["f_pref"] == pytest.approx(want, rel=1e-6)
    assert out["reward_acc"] == 0.75  # r > 0 agrees with desirability for 3 of 4
    assert out["reward_margin"] == pytest.approx(0.5 * ((1 + 3) / 2 - (-2 + 0.5) / 2))


def test_calibration_cache_follows_the_data_and_the_model(tiny_config, tiny_data, tmp_path):
    """Editing a data file or a local model in place must not reuse a stale ideal point."""
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.models.save import save_model

    model_path = tmp_path / "local-model"
    model, tok = load_model(ModelConfig(name="builtin:tiny"))
    save_model(model, tok, model_path)
    raw = tiny_config("maxright", max_steps=2)
    raw["model"] = {"name": str(model_path)}
    raw["schedule"]["calibration_steps"] = 2
    cfg = parse_config(raw)

    def calibrated() -> tuple[object, str]:
        console = Console(record=True, width=200)
        star = calibrate(cfg, console)
        return star, console.export_text()

    first, log = calibrated()
    assert "calibration cache" not in log
    assert calibrated()[1].count("calibration cache") == 1  # unchanged: a hit

    write_jsonl(  # the SFT eval file edited in place: other records
        tiny_data["sft_eval"],
        [
            {"messages": [{"role": "user", "content": f"Who is the {a}?"},
                          {"role": "assistant", "content": f"It is a {a}, friend."}]}
            for a in ANIMALS[:3]
        ],
    )  # fmt: skip
    second, log = calibrated()
    assert "calibration cache" not in log and second.f_sft != first.f_sft

    from safetensors.torch import load_file, save_file

    weights_file = model_path / "model.safetensors"
    weights = load_file(weights_file)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, weights_file, metadata={"format": "pt"})  # the model edited in place
    third, log = calibrated()
    assert "calibration cache" not in log and third.f_sft != second.f_sft
