from pathlib import Path

import pytest

from unitune.config import ConfigError, load_config, parse_config

BASE = {"data": {"sft": {"train": "a.jsonl"}, "pref": {"train": "b.jsonl"}}}


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml(tmp_path):
    p = write(tmp_path, "data:\n  sft: {train: a.jsonl}\n  pref: {train: b.jsonl}\n")
    cfg = load_config(p)
    assert cfg.schedule.name == "alright" and cfg.schedule.lam == 0.5
    assert cfg.objectives.pref.name == "dpo" and cfg.objectives.pref.params().beta == 0.1
    assert cfg.model.trust_remote_code is False


def test_unknown_key_names_its_path(tmp_path):
    p = write(tmp_path, "data:\n  sft: {train: a.jsonl, evil: 1}\n  pref: {train: b.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "data.sft.evil: unknown key" in str(e.value) and str(p) in str(e.value)


def test_bad_value_names_its_path():
    with pytest.raises(ConfigError, match=r"schedule\.lam"):
        parse_config(BASE | {"schedule": {"lam": 1.5}})
    with pytest.raises(ConfigError, match=r"train\.lr_schedule"):
        parse_config(BASE | {"train": {"lr_schedule": "exponential"}})


def test_objective_params_are_validated():
    with pytest.raises(ConfigError, match=r"objectives\.pref.*bta"):
        parse_config(BASE | {"objectives": {"pref": {"name": "dpo", "bta": 0.1}}})
    with pytest.raises(ConfigError, match=r"objectives\.pref.*unknown objective 'dpp'"):
        parse_config(BASE | {"objectives": {"pref": {"name": "dpp"}}})
    cfg = parse_config(BASE | {"objectives": {"pref": {"name": "dpo", "beta": 0.3}}})
    assert cfg.objectives.pref.params().beta == 0.3


def test_schedule_needs_its_data():
    with pytest.raises(ConfigError, match="needs data.pref"):
        parse_config({"data": {"sft": {"train": "a.jsonl"}}, "schedule": {"name": "mix"}})
    parse_config({"data": {"sft": {"train": "a.jsonl"}}, "schedule": {"name": "sft"}})


def test_set_overrides(tmp_path):
    p = write(tmp_path, "data:\n  sft: {train: a.jsonl}\n  pref: {train: b.jsonl}\n")
    cfg = load_config(p, ["schedule.name=maxright", "train.lr=1e-4", "objectives.pref.beta=0.2"])
    assert cfg.schedule.name == "maxright" and cfg.train.lr == 1e-4
    assert cfg.objectives.pref.params().beta == 0.2
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["schedule.name"])


def test_ideal_config_needs_both_stars():
    with pytest.raises(ConfigError, match="f_sft_star"):
        parse_config(BASE | {"schedule": {"ideal": "config", "f_sft_star": 1.0}})


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_example_config_is_valid(path):
    if path.name.startswith("sweep-"):  # a sweep file: every run's config must be valid
        from unitune.study.sweep import load_sweep

        configs = [r.cfg for r in load_sweep(path).runs]
        assert len(configs) > 1
    else:
        configs = [load_config(path)]
    for cfg in configs:
        assert cfg.data.sft is not None or cfg.data.pref is not None
