"""The registries own their facts: an objective its slot and the metric it equals, a schedule its
slots and whether its plan depends on the total steps. The config asks them and names none."""

import inspect
import json
import re
from pathlib import Path

import pytest

import unitune.config
from unitune.config import ConfigError, parse_config
from unitune.jobs import train
from unitune.objectives import DEFAULT_OBJECTIVE, REGISTRY, register
from unitune.objectives.types import PairLogps
from unitune.schedules.registry import SCHEDULES, Stateless, register_schedule


def test_every_objective_fits_its_own_slot_only(tiny_config):
    raw = tiny_config("alright")
    for name, obj in REGISTRY.items():
        other = "pref" if obj.slot == "sft" else "sft"
        cfg = parse_config({**raw, "objectives": {obj.slot: {"name": name}}})
        assert getattr(cfg.objectives, obj.slot).name == name
        with pytest.raises(ConfigError, match=rf"objectives\.{other}: .*'{name}' is a"):
            parse_config({**raw, "objectives": {other: {"name": name}}})
    assert {s: REGISTRY[n].slot for s, n in DEFAULT_OBJECTIVE.items()} == {
        "sft": "sft",
        "pref": "pref",
    }


def test_the_metric_an_objective_equals_is_its_own_declaration(tiny_config):
    def margin(lp: PairLogps, *, beta: float = 0.1):
        return -(beta * (lp.chosen.ratio - lp.rejected.ratio)).mean()

    register(margin, name="margin_eq", data="pairs", needs_ref=True, source="test",
             metric="f_pref")  # fmt: skip
    register(margin, name="margin_own", data="pairs", needs_ref=True, source="test")
    try:
        raw = tiny_config("alright")
        cfg = parse_config({**raw, "objectives": {"pref": {"name": "margin_eq"}}})
        assert cfg.own_loss_is_metric("pref") and cfg.own_loss_key("pref") == "f_pref"
        cfg = parse_config({**raw, "objectives": {"pref": {"name": "margin_eq", "beta": 0.2}}})
        assert not cfg.own_loss_is_metric("pref")  # only at eval.beta
        assert cfg.own_loss_key("pref") == "loss_margin_eq"
        cfg = parse_config({**raw, "objectives": {"pref": {"name": "margin_own"}}})
        assert not cfg.own_loss_is_metric("pref") and cfg.own_loss_key("pref") == "loss_margin_own"
        with pytest.raises(ValueError, match="a pref objective cannot equal f_sft"):
            register(margin, name="margin_bad", data="pairs", needs_ref=True, source="test",
                     metric="f_sft")  # fmt: skip
    finally:
        for name in ("margin_eq", "margin_own", "margin_bad"):
            REGISTRY.pop(name, None)


def test_a_schedule_declares_its_slots_and_whether_it_depends_on_the_total_steps():
    assert {n: c.depends_on_total_steps for n, c in SCHEDULES.items()} == {
        n: n == "sequential" for n in SCHEDULES
    }
    assert SCHEDULES["sft"].slots == ("sft",) and SCHEDULES["pref"].slots == ("pref",)
    assert all(set(c.slots) <= {"sft", "pref"} and c.slots for c in SCHEDULES.values())
    for wrong in ((), ("sft", "rl")):
        with pytest.raises(ValueError, match="slots must be 'sft' and/or 'pref'"):

            @register_schedule
            class Bad(Stateless):
                name = "bad"
                slots = wrong

                def plan(self, step, probe):
                    return {"sft": 1.0}

    assert "bad" not in SCHEDULES


def test_a_new_schedule_s_slots_decide_the_data_it_needs(tiny_config):
    """An SFT-only schedule registered here: the config asks only for data.sft, allows PAFT's L1
    with it, and a run trains SFT alone."""

    @register_schedule
    class SftThenSft(Stateless):
        name = "sft_twice"
        slots = ("sft",)

        def plan(self, step, probe):
            return {"sft": 1.0}

    try:
        raw = tiny_config("sft_twice", max_steps=2)
        raw["data"]["pref"] = None
        raw["schedule"]["l1"] = 0.01
        summary = train(parse_config(raw), progress=False)
        assert summary["steps"] == {"sft": 2, "pref": 0}
        rows = [json.loads(x) for x in (Path(raw["output_dir"]) / "metrics.jsonl").open()]
        assert all("loss_pref" not in r for r in rows if r["type"] == "train")
        raw["data"]["sft"] = None
        with pytest.raises(ConfigError, match="schedule 'sft_twice' needs data.sft"):
            parse_config(raw)
        raw = tiny_config("mix")
        raw["schedule"]["l1"] = 0.01
        with pytest.raises(ConfigError, match=r"l1 .*one that trains SFT only \(.*sft_twice"):
            parse_config(raw)
    finally:
        del SCHEDULES["sft_twice"]


def test_the_config_names_no_objective_or_schedule():
    """config.py asks the registries; a name there would be a fact kept in two places. Slot names
    (`sft`, `pref`) are the config's own keys."""
    source = inspect.getsource(unitune.config)
    named = {n for n in [*REGISTRY, *SCHEDULES] if n not in ("sft", "pref")}
    found = sorted(n for n in named if re.search(rf"[\"']{n}[\"']", source))
    assert not found, f"config.py names {found}"
