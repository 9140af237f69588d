"""How a run maps onto Accelerate's engines, and what each one cannot do.

The launcher chooses the engine: `accelerate launch --config_file examples/accelerate/<x>.yaml`
(DDP, FSDP, DeepSpeed ZeRO) or `torchrun` (DDP). `accelerator(cfg)` builds the Accelerator for
it, `Engine.of(acc)` names it, `check(cfg, engine)` refuses at start-up a combination that cannot
work (saying why and what to use instead), and `fill_deepspeed(cfg, acc)` writes the run's batch,
accumulation and clipping into DeepSpeed's config, where `train.*` is the one source of truth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from unitune.config import Config
from unitune.models.vllm_generator import check_vllm
from unitune.training import trackers


class EngineError(ValueError):
    """An engine and a config that cannot work together (raised before any training)."""


def _asked(name: str) -> bool:
    """Whether the launcher (accelerate launch's environment) asks for an engine."""
    return os.environ.get(name, "false").lower() == "true"


def accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator. With no accelerator device, `cpu=True` is what lets Accelerate see
    a torchrun / accelerate launch of several CPU processes (MULTI_CPU, gloo), except under
    DeepSpeed, whose CPU accelerator needs `cpu=False` and the gloo backend named (Accelerate
    finds no backend on a CPU machine and would see one process)."""
    no_device = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    deepspeed = _asked("ACCELERATE_USE_DEEPSPEED")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if no_device and deepspeed else []
    absent = trackers.missing(cfg.train.report_to)  # train.report_to's packages, before anything
    if absent:
        raise EngineError(absent)
    try:
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            cpu=no_device and not deepspeed,
            gradient_accumulation_steps=cfg.train.grad_accum,
            kwargs_handlers=handlers,
            **trackers.accelerator_kwargs(cfg),  # log_with, <output_dir>/trackers/
        )
    except ImportError as e:  # the launch asks for DeepSpeed, which is not installed
        raise EngineError(f"{e}; install it with: pip install 'unitune[deepspeed]'") from None


@dataclass(frozen=True)
class Engine:
    """The engine a run is on: `kind` is "single", "ddp", "fsdp" or "deepspeed"."""

    kind: str
    processes: int
    zero_stage: int = 0  # DeepSpeed
    zero3_init: bool = False  # DeepSpeed: partition the model while loading it
    gathers_on_save: bool = False  # ZeRO-3: stage3_gather_16bit_weights_on_model_save
    fsdp_version: int = 0
    orig_params: bool = True  # FSDP1: use_orig_params
    fsdp_requested: bool = False  # the launch asked for FSDP (ACCELERATE_USE_FSDP)

    @classmethod
    def of(cls, acc: Accelerator) -> Engine:
        kind = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
            acc.distributed_type, "ddp" if acc.num_processes > 1 else "single"
        )
        facts: dict = {"fsdp_requested": _asked("ACCELERATE_USE_FSDP")}
        if kind == "deepspeed":
            ds = acc.state.deepspeed_plugin
            zero = ds.deepspeed_config.get("zero_optimization", {})
            facts |= {
                "zero_stage": int(ds.zero_stage or 0),
                "zero3_init": bool(ds.zero3_init_flag),
                "gathers_on_save": bool(zero.get("stage3_gather_16bit_weights_on_model_save")),
            }
        if kind == "fsdp":
            fsdp = acc.state.fsdp_plugin
            facts |= {"fsdp_version": int(fsdp.fsdp_version), "orig_params": fsdp.use_orig_params}
        return cls(kind, acc.num_processes, **facts)

    @property
    def shards_parameters(self) -> bool:
        """Each process holds a shard of every weight (FSDP, ZeRO-3)."""
        return self.kind == "fsdp" or self.zero_stage == 3

    @property
    def shards_optimizer(self) -> bool:
        """Each process holds a shard of the optimizer state (FSDP, ZeRO-1/2/3): checkpoints
        go through Accelerate's `save_state` / `load_state`."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage >= 1)

    def describe(self) -> str:
        if self.kind == "single":
            return "one process"
        name = {
            "ddp": "DDP",
            "fsdp": f"FSDP{self.fsdp_version}",
            "deepspeed": f"DeepSpeed ZeRO-{self.zero_stage}",
        }[self.kind]
        return f"{name}, {self.processes} process{'es' if self.processes > 1 else ''}"


def check(cfg: Config, engine: Engine) -> None:
    """Refuse, before anything is loaded, what cannot work on `engine`, or on this machine
    (`online.generator: vllm` without the package or a CUDA GPU)."""
    if cfg.is_online and cfg.online.generator == "vllm":
        why = check_vllm()
        if why is not None:
            raise EngineError(why)
    tc, problems = cfg.train, []
    if engine.fsdp_requested and engine.kind != "fsdp":
        problems.append(
            "the launch asks for FSDP, but Accelerate enables FSDP only with an accelerator "
            "(GPU, XPU, NPU, ...) and this machine has none: use DDP (torchrun) or DeepSpeed "
            "(examples/accelerate/zero2.yaml, zero3.yaml), which run on CPU"
        )
    if engine.kind == "deepspeed":
        if tc.on_nonfinite == "skip":
            problems.append(
                "train.on_nonfinite: skip: DeepSpeed steps the optimizer in the backward "
                "pass, so a non-finite step cannot be skipped (use on_nonfinite: error)"
            )
        if tc.mixed_precision == "fp16":
            problems.append(
                "train.mixed_precision: fp16: DeepSpeed's loss scaler skips overflowing steps "
                "by itself, which unitune would report as non-finite; use bf16"
            )
    if engine.shards_parameters:
        if tc.compile:
            problems.append(
                "train.compile: the decoder is compiled whole, and each process holds a shard "
                "of it: use DDP or ZeRO-2"
            )
        if cfg.schedule.l1 > 0:
            problems.append(
                "schedule.l1 > 0 (PAFT's L1 penalty; parallel.l1 for job parallel's SFT branch) "
                "reads whole weights and keeps a full copy of the starting ones, but each "
                "process holds a shard: use DDP or ZeRO-2"
            )
        if cfg.is_online and cfg.schedule.name == "sequential":
            problems.append(
                "schedule sequential with an online preference slot: at the switch the current "
                "model becomes the reference as a whole frozen copy, but each process holds a "
                "shard of it: use DDP or ZeRO-2"
            )
        if cfg.model.lora is not None and cfg.model.lora.merge_on_save:
            problems.append(
                "model.lora.merge_on_save needs the whole model on one process: save the "
                "adapter (merge_on_save: false) and merge it with peft's merge_and_unload"
            )
    if engine.zero_stage == 3 and engine.zero3_init:
        problems.append(
            "zero3_init_flag: true: unitune loads the model whole on each process and ZeRO-3 "
            "partitions it when the run starts; set zero3_init_flag: false"
        )
    if engine.zero_stage == 3 and tc.save_model and not engine.gathers_on_save:
        problems.append(
            "train.save_model under ZeRO-3 needs the weights gathered on save: set "
            "zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save)"
        )
    if engine.fsdp_version == 1 and cfg.model.lora is not None and not engine.orig_params:
        problems.append(
            "LoRA under FSDP1 mixes frozen and trained weights in one flat parameter: set "
            "fsdp_use_orig_params: true (or use FSDP2, fsdp_version: 2)"
        )
    if problems:
        raise EngineError(f"{engine.describe()}: " + "; ".join(problems))


def fill_deepspeed(cfg: Config, acc: Accelerator) -> None:
    """The run's DeepSpeed config completed from `cfg` (`deepspeed_values`), in place. There is no
    data loader for Accelerate to read the batch size from, and DeepSpeed would otherwise
    override the run's accumulation with its own (Accelerate only warns)."""
    if acc.state.deepspeed_plugin is not None:
        deepspeed_values(acc.state.deepspeed_plugin.deepspeed_config, cfg, acc.num_processes)


def deepspeed_values(conf: dict, cfg: Config, processes: int) -> None:
    """Put `train.batch_size`, `grad_accum` and `max_grad_norm` (and the global batch) into a
    DeepSpeed config where it says "auto" or nothing; a number there that differs, or an
    optimizer or scheduler section (train.* sets those), is an `EngineError`."""
    tc = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": ("train.batch_size", tc.batch_size),
        "gradient_accumulation_steps": ("train.grad_accum", tc.grad_accum),
        "gradient_clipping": ("train.max_grad_norm", tc.max_grad_norm or 0.0),
        "train_batch_size": ("the global batch", tc.batch_size * tc.grad_accum * processes),
    }
    for key, (name, value) in ours.items():
        given = conf.get(key, "auto")
        if given == "auto":
            conf[key] = value
        elif float(given) != float(value):
            raise EngineError(
                f'DeepSpeed config: {key} is {given}, but {name} is {value}: set it to "auto" '
                "(unitune fills it in) or to the same value"
            )
    for key in ("optimizer", "scheduler"):
        if key in conf:
            raise EngineError(
                f"DeepSpeed config: remove its {key!r} section; train.lr, lr_schedule, "
                "warmup_steps and weight_decay set them"
            )
