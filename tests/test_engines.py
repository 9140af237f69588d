"""What each engine cannot do is refused at start-up with the reason; DeepSpeed's config is
completed from train.* (`engines.py`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unitune.config import parse_config
from unitune.training.engines import Engine, EngineError, check, deepspeed_values

L1 = {"name": "sft", "l1": 0.1}  # PAFT's penalty, on its SFT branch
ZERO3 = Engine("deepspeed", 2, zero_stage=3, gathers_on_save=True)
REFUSED = [  # (engine, config change, words of the reason)
    (Engine("deepspeed", 2, zero_stage=2), {"train": {"on_nonfinite": "skip"}}, "in the backward"),
    (Engine("deepspeed", 2, zero_stage=2), {"train": {"mixed_precision": "fp16"}}, "use bf16"),
    (ZERO3, {"schedule": L1}, "PAFT's L1 penalty"),
    (Engine("fsdp", 2, fsdp_version=2), {"schedule": L1}, "use DDP or ZeRO-2"),
    (ZERO3, {"model": {"lora": {"merge_on_save": True}}}, "merge_and_unload"),
    (Engine("deepspeed", 2, zero_stage=3, zero3_init=True, gathers_on_save=True), {},
     "zero3_init_flag: false"),
    (Engine("deepspeed", 2, zero_stage=3), {}, "zero3_save_16bit_model: true"),
    (Engine("fsdp", 2, fsdp_version=1, orig_params=False), {"model": {"lora": {}}},
     "fsdp_use_orig_params: true"),
    (Engine("ddp", 2, fsdp_requested=True), {}, "only with an accelerator"),
    (Engine("fsdp", 2, fsdp_version=2), {"schedule": {"name": "sequential"},
     "objectives": {"pref": {"name": "grpo", "beta": 0.04}},
     "online": {"rewards": ["length:8"], "num_generations": 2}}, "whole frozen copy"),
]  # fmt: skip


def with_changes(raw: dict, change: dict) -> dict:
    out = dict(raw)
    for key, sub in change.items():
        out[key] = {**out.get(key, {}), **sub}
    if "lora" in change.get("model", {}):
        out["model"] = {"name": "builtin:tiny", "lora": change["model"]["lora"]}
    return out


@pytest.mark.parametrize(("engine", "change", "reason"), REFUSED)
def test_an_impossible_combination_is_refused_with_its_reason(tiny_config, engine, change, reason):
    cfg = parse_config(with_changes(tiny_config("alright"), change))
    with pytest.raises(EngineError, match=reason) as err:
        check(cfg, engine)
    assert str(err.value).startswith(engine.describe())


@pytest.mark.parametrize("engine", [Engine("ddp", 2), Engine("deepspeed", 2, zero_stage=2)])
def test_what_an_engine_can_do_passes(tiny_config, engine):
    """PAFT's L1 penalty and a merged LoRA save work where each process holds whole weights."""
    raw = with_changes(tiny_config("alright"), {"schedule": L1})
    raw["model"] = {"name": "builtin:tiny", "lora": {"merge_on_save": True}}
    check(parse_config(raw), engine)


def test_deepspeed_config_takes_the_run_s_batch_accumulation_and_clipping(tiny_config):
    cfg = parse_config(tiny_config("alright", batch_size=3, grad_accum=2, max_grad_norm=0.5))
    conf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    deepspeed_values(conf, cfg, processes=4)
    assert conf == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                    "gradient_clipping": 0.5, "train_batch_size": 24}  # fmt: skip
    deepspeed_values(dict(conf), cfg, processes=4)  # the same numbers, stated: fine
    with pytest.raises(
        EngineError, match=r"gradient_accumulation_steps is 1, but train\.grad_accum is 2"
    ):
        deepspeed_values({"gradient_accumulation_steps": 1}, cfg, processes=4)
    with pytest.raises(EngineError, match="remove its 'optimizer' section"):
        deepspeed_values({"optimizer": {"type": "AdamW"}}, cfg, processes=4)


def test_an_fsdp_launch_on_a_machine_without_accelerator_stops_at_start_up(tiny_config, tmp_path):
    """Accelerate would quietly run DDP instead: the user is told, before anything loads."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config("alright")))
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "1", "-m", "unitune.cli", "train", str(path)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    said = "error: one process: the launch asks for FSDP, but Accelerate enables FSDP only with an"
    assert said in out.stdout and "Traceback" not in out.stdout
