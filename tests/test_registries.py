"""The registries own their facts: an objective its slot and the metric it equals, a schedule its
slots and whether its plan depends on the total steps. The config asks them and names none."""

import inspect
import json
import re
from pathlib import Path

import pytest

import unitune.config
from unitune.config import ConfigError, parse_config
from unitune.data.errors import DataError, RecordError
from unitune.data.validation import NAMED_FORMATS, chat_example, register_format
from unitune.jobs import train
from unitune.objectives import DEFAULT_OBJECTIVE, REGISTRY, register
from unitune.objectives.types import PairLogps
from unitune.schedules.registry import SCHEDULES, Stateless, register_schedule


def test_every_objective_fits_its_own_slot_only(tiny_config):
    raw = tiny_config("alright")
    for name, obj in REGISTRY.items():
        other = "pref" if obj.slot == "sft" else "sft"
        # an objective on prompts (online) trains from rewards: the config names one
        online = {}
        if obj.data == "prompts":
            online = {"online": {"rewards": ["length:10"], "num_generations": 2}}
        cfg = parse_config({**raw, "objectives": {obj.slot: {"name": name}}, **online})
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
        with pytest.raises(ConfigError, match=r"l1 .*trains SFT only \(.*sft_twice.*parallel\.l1"):
            parse_config(raw)
    finally:
        del SCHEDULES["sft_twice"]


def test_a_new_data_format_is_one_function_and_one_registry_line(tiny_config, tmp_path):
    """Formats asked for by name: an SFT one (`ask`/`tell`) and a preference one
    (`ask`/`good`/`bad`), each a function and one register line, trained on through the config;
    the same records in the standard formats train the same run."""
    from conftest import ANIMALS, pref_records, sft_records, write_jsonl

    def chat(ask: str, answer: str, answer_field: str):
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        return chat_example(messages, 1, "ask", answer_field)

    def read_qa(record):
        return chat(record["ask"], record["tell"], "tell")

    def read_good_bad(record):
        if record["good"] == record["bad"]:
            raise RecordError("good", "identical", "identical to 'bad'")
        return chat(record["ask"], record["good"], "good"), chat(
            record["ask"], record["bad"], "bad"
        )

    register_format("qa", kind="demonstrations", fields=("ask", "tell"), read=read_qa,
                    description="qa (ask, tell)")  # fmt: skip
    register_format("good_bad", kind="pairs", fields=("ask", "good", "bad"), read=read_good_bad,
                    description="good_bad (ask, good, bad)")  # fmt: skip
    try:
        sft = [{"ask": r["messages"][0]["content"], "tell": r["messages"][1]["content"]}
               for r in sft_records(ANIMALS)]  # fmt: skip
        pref = [{"ask": r["prompt"][0]["content"], "good": r["chosen"][0]["content"],
                 "bad": r["rejected"][0]["content"]} for r in pref_records(ANIMALS)]  # fmt: skip
        for name, rows in (("sft", sft), ("pref", pref)):
            write_jsonl(tmp_path / f"{name}.jsonl", rows)
        raw = tiny_config("mix", max_steps=2, eval_every=2)
        std = tiny_config("mix", max_steps=2, eval_every=2)
        std["data"]["sft"] = {"train": str(tmp_path / "sft-std.jsonl")}
        std["data"]["pref"] = {"train": str(tmp_path / "pref-std.jsonl")}
        write_jsonl(tmp_path / "sft-std.jsonl", sft_records(ANIMALS))
        write_jsonl(tmp_path / "pref-std.jsonl", pref_records(ANIMALS))
        raw["data"]["sft"] = {"train": str(tmp_path / "sft.jsonl"), "format": "qa"}
        raw["data"]["pref"] = {"train": str(tmp_path / "pref.jsonl"), "format": "good_bad"}
        raw["output_dir"], std["output_dir"] = str(tmp_path / "new"), str(tmp_path / "std")
        ours, theirs = (train(parse_config(c), progress=False) for c in (raw, std))
        assert ours["steps"] == theirs["steps"] == {"sft": 2, "pref": 2}
        rows = [
            [json.loads(x) for x in (Path(c["output_dir"]) / "metrics.jsonl").open()]
            for c in (raw, std)
        ]
        losses = [[r["loss"] for r in rs if r["type"] == "train"] for rs in rows]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        raw["data"]["sft"]["format"] = "good_bad"  # a preference format in the SFT slot
        raw["output_dir"] = str(tmp_path / "wrong")
        with pytest.raises(DataError, match="data.sft.format: good_bad is a preference format"):
            train(parse_config(raw), progress=False)
    finally:
        del NAMED_FORMATS["qa"], NAMED_FORMATS["good_bad"]
    with pytest.raises(ConfigError, match="unknown format 'qa'"):
        parse_config({**raw, "data": {**raw["data"], "sft": {"train": "x", "format": "qa"}}})


def test_the_config_names_no_objective_or_schedule():
    """config.py asks the registries; a name there would be a fact kept in two places. Slot names
    (`sft`, `pref`) are the config's own keys."""
    source = inspect.getsource(unitune.config)
    named = {n for n in [*REGISTRY, *SCHEDULES] if n not in ("sft", "pref")}
    found = sorted(n for n in named if re.search(rf"[\"']{n}[\"']", source))
    assert not found, f"config.py names {found}"
