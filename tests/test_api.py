"""The Python API (`unitune.api`): train from a dict with `datasets.Dataset`s, a `Config` or a
YAML path; evaluate; merge; sweep; errors raised as the exceptions the CLI prints; a cheap
`import unitune`."""

import importlib
import json
import subprocess
import sys

import pytest
import yaml
from conftest import ANIMALS, TIMING, pref_records, run_records, sft_records, write_jsonl
from datasets import Dataset, DatasetDict

import unitune
from unitune import api
from unitune.config import ConfigError, MergeConfig, parse_config
from unitune.data import DataError
from unitune.training.rundir import RunDirLocked, lock_output_dir

RECORDS = {
    ("sft", "train"): sft_records(ANIMALS * 2),
    ("sft", "eval"): sft_records(["hen", "ram", "gnu"]),
    ("pref", "train"): pref_records(ANIMALS * 2),
    ("pref", "eval"): pref_records(["hen", "ram", "gnu"]),
}


SUMMARIES = ("ds_summary", "jsonl_summary")


def config(out, cache, data: dict, **train) -> dict:
    """builtin:tiny, alright at lam 0.5, 3 steps, `data` as {(slot, split): path or Dataset}."""
    slots = {}
    for (slot, split), source in data.items():
        slots.setdefault(slot, {})[split] = source
    return {
        "model": {"name": "builtin:tiny"},
        "data": {**slots, "max_length": 64},
        "schedule": {"name": "alright", "lam": 0.5},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "eval_every": 3, "seed": 0, **train},
        "output_dir": str(out),
        "cache_dir": str(cache),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run twice, its data as Datasets and as JSONL files; and a run from a `Config`
    with another seed (a model that differs, for the merge)."""
    root = tmp_path_factory.mktemp("api")
    datasets = {key: Dataset.from_list(rows) for key, rows in RECORDS.items()}
    files = {
        key: str(write_jsonl(root / f"{key[0]}_{key[1]}.jsonl", rows))
        for key, rows in RECORDS.items()
    }
    out = {"root": root, "files": files, "datasets": datasets}
    out["ds_summary"] = unitune.train(
        config(root / "from_datasets", root / "cache", datasets), progress=False
    )
    out["jsonl_summary"] = unitune.train(
        config(root / "from_jsonl", root / "cache", files), progress=False
    )
    cfg = parse_config(config(root / "from_config", root / "cache", files, seed=1))
    out["config_summary"] = unitune.train(cfg, progress=False)
    return out


def test_a_run_from_datasets_equals_the_run_from_the_same_records_as_jsonl(runs):
    root = runs["root"]
    a, b = root / "from_datasets", root / "from_jsonl"
    assert run_records(a) == run_records(b)
    assert len(run_records(a)) >= 4  # the evaluation at 0 and 3, three training steps
    assert runs["ds_summary"] == json.loads((a / "summary.json").read_text())
    finals = [{k: v for k, v in runs[s]["final"].items() if k not in TIMING} for s in SUMMARIES]
    assert finals[0] == finals[1] and "f_sft" in finals[0]
    # the run directory holds its data: the config points at the saved copies
    saved = yaml.safe_load((a / "config.yaml").read_text())["data"]
    for slot, split in RECORDS:
        assert saved[slot][split] == str(a / "datasets" / f"{slot}-{split}")
        assert Dataset.load_from_disk(saved[slot][split]).to_list() == RECORDS[slot, split]


def test_a_dataset_is_tokenized_once_and_saved_once(runs, tmp_path):
    """The tokenized-data cache keys a saved Dataset by its content: training again from the same
    Datasets into another directory adds no cache entry; saving into a directory that holds the
    same dataset keeps the copy there."""
    cache = runs["root"] / "cache" / "data"
    before = sorted(p.name for p in cache.iterdir())
    cfg = config(tmp_path / "again", runs["root"] / "cache", runs["datasets"], max_steps=1)
    unitune.train(cfg, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == before
    saved = runs["root"] / "from_datasets" / "datasets" / "sft-train"
    stamp = (saved / "state.json").stat().st_mtime_ns
    assert api.save_dataset(runs["datasets"]["sft", "train"], saved) == str(saved)
    assert (saved / "state.json").stat().st_mtime_ns == stamp
    other = Dataset.from_list(RECORDS["sft", "eval"])
    api.save_dataset(other, saved)
    assert Dataset.load_from_disk(str(saved)).to_list() == RECORDS["sft", "eval"]


def test_train_from_a_yaml_path_with_overrides(runs, tmp_path):
    path = tmp_path / "run.yaml"
    cfg = config(tmp_path / "from_path", runs["root"] / "cache", runs["files"])
    path.write_text(yaml.safe_dump(cfg))
    summary = unitune.train(path, overrides=["train.max_steps=1", "name=short"], progress=False)
    assert summary["name"] == "short" and summary["steps"]
    assert json.loads((tmp_path / "from_path" / "summary.json").read_text()) == summary
    assert (
        yaml.safe_load((tmp_path / "from_path" / "config.yaml").read_text())["train"]["max_steps"]
        == 1
    )


def test_evaluate_a_run_directory(runs):
    run = runs["root"] / "from_datasets"  # its held-out prompts are read from the saved copy
    report = unitune.evaluate(run, max_new_tokens=4, progress=False)
    assert report == json.loads((run / "eval" / "eval.json").read_text())
    assert report["n"] == 3 and report["judge"] == "demo"  # data.pref.eval: 3 pairs
    assert report["wins"] + report["ties"] + report["losses"] == 3
    assert len((run / "eval" / "generations.jsonl").read_text().splitlines()) == 3


def test_merge_two_trained_models(runs, tmp_path):
    from safetensors.torch import load_file

    root = runs["root"]
    models = [str(root / name / "model") for name in ("from_datasets", "from_config")]
    spec = {
        "base": "builtin:tiny",
        "models": [{"path": p} for p in models],
        "method": "task_arithmetic",
        "output": str(tmp_path / "merged"),
    }
    report = unitune.merge(spec, progress=False)
    assert report["output"] == str(tmp_path / "merged") and report["method"] == "task_arithmetic"
    assert [m["path"] for m in report["models"]] == models
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    a, b = (load_file(f"{m}/model.safetensors") for m in models)
    base = load_file(str(_tiny_dir(tmp_path) / "model.safetensors"))
    name = "model.norm.weight"
    assert merged[name].allclose(base[name] + (a[name] - base[name]) + (b[name] - base[name]))
    again = unitune.merge(
        MergeConfig(**spec), overrides=[f"output={tmp_path / 'm2'}"], progress=False
    )
    assert again["output"] == str(tmp_path / "m2")


def _tiny_dir(tmp_path):
    from unitune.models.config import ModelConfig
    from unitune.models.load import load_model
    from unitune.models.save import save_model

    path = tmp_path / "tiny"
    save_model(*load_model(ModelConfig(name="builtin:tiny")), path)
    return path


def test_sweep_from_a_dict_with_datasets(runs, tmp_path):
    base = config(tmp_path / "unused", runs["root"] / "cache", runs["datasets"], max_steps=1)
    spec = {"config": base, "output_dir": str(tmp_path / "sweep"), "grid": {"train.seed": [0, 1]}}
    results = unitune.sweep(spec, progress=False)
    assert [(r["name"], r["status"]) for r in results] == [
        ("seed-0", "trained"),
        ("seed-1", "trained"),
    ]
    for r in results:
        saved = yaml.safe_load((tmp_path / "sweep" / r["name"] / "config.yaml").read_text())
        assert saved["data"]["sft"]["train"] == str(tmp_path / "sweep" / "datasets" / "sft-train")
    assert [r["status"] for r in unitune.sweep(spec, progress=False)] == ["skipped", "skipped"]


def test_errors_are_raised_as_the_cli_prints_them(runs, tmp_path):
    cache = runs["root"] / "cache"
    with pytest.raises(ConfigError, match="nonsense: unknown key"):
        unitune.train({"data": {"sft": {"train": "x.jsonl"}}, "nonsense": 1})
    with pytest.raises(ConfigError, match="no such file"):
        unitune.train(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        unitune.merge(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="models"):
        unitune.merge({"base": "builtin:tiny", "output": str(tmp_path / "m")})
    whole = DatasetDict({"train": runs["datasets"]["sft", "train"]})
    with pytest.raises(ConfigError, match=r"data.sft.train: a DatasetDict; give one split"):
        unitune.train(config(tmp_path / "dd", cache, {("sft", "train"): whole}, max_steps=1))
    with pytest.raises(ConfigError, match="data.sft.train: Input should be a valid string"):
        unitune.train(config(tmp_path / "list", cache, {("sft", "train"): [{"a": 1}]}))
    busy = tmp_path / "busy"
    with lock_output_dir(busy), pytest.raises(RunDirLocked, match="in use by another run"):
        unitune.train(config(busy, cache, runs["datasets"], max_steps=1), progress=False)
    assert not (busy / "datasets").exists()  # a running run's data is left alone
    bad = RECORDS["sft", "train"][:3] + [{"messages": [{"role": "user", "content": "hi"}]}]
    data = {
        ("sft", "train"): Dataset.from_list(bad),
        ("pref", "train"): runs["files"]["pref", "train"],
    }
    with pytest.raises(DataError) as err:
        unitune.train(config(tmp_path / "bad", cache, data, max_steps=1), progress=False)
    assert err.value.path == str(tmp_path / "bad" / "datasets" / "sft-train")
    assert err.value.record == 4 and err.value.field == "messages"
    with pytest.raises(ConfigError, match="give --prompts FILE"):
        unitune.evaluate("builtin:tiny")


def test_import_unitune_is_cheap_and_the_api_is_reached_from_it():
    code = (
        "import sys, unitune; print(unitune.__version__); "
        "assert not {'torch', 'unitune.api', 'unitune.config'} & set(sys.modules), sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert unitune.api is api and unitune.ConfigError is ConfigError
    assert unitune.DataError is DataError
    with pytest.raises(AttributeError):
        unitune.nonsense  # noqa: B018
    # the layers' packages (training/, merging/) never shadow the functions of the same command
    importlib.import_module("unitune.merging.merge")
    importlib.import_module("unitune.training.loop")
    for name in ("train", "evaluate", "merge", "sweep"):
        assert getattr(unitune, name) is getattr(api, name) and callable(getattr(unitune, name))
