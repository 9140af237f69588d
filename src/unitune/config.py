"""The run configuration: one pydantic model that a YAML file mirrors.

Unknown keys are errors; every error names the key's dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from unitune.core.schema import Strict
from unitune.models.config import ModelConfig

# a field's json_schema_extra when a resumed run may change it: it does not change what was
# already trained (train/resume.py reads it)
RESUMABLE = {"resumable": True}


class DatasetConfig(Strict):
    train: str  # JSONL / JSON / Parquet file, a `datasets` directory or a hub id
    eval: str | None = None  # held-out file; if absent, `eval_fraction` of train is held out
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split: str = "train"  # split name for hub ids / datasets directories
    max_samples: int | None = Field(None, gt=0)  # train on the first N records (after checks)
    eval_max_samples: int | None = Field(None, gt=0)  # evaluate on the first N held-out records
    score_range: tuple[float, float] | None = None  # unpaired scores: [min, max] -> [0, 1]
    # rename source columns to the standard fields, e.g. {prompt: instruction, completion: output}
    columns: dict[str, str] | None = None
    # "auto" detects the format from the first record's keys; a named format (data.validation's
    # NAMED_FORMATS, e.g. "alpaca": instruction / input / output; README, "Data") is asked for
    format: str = "auto"
    # preference only: unpaired scores -> labels at load time; a score mapped to [0, 1] by
    # score_range is desirable when >= label_threshold (what kto and una_binary need)
    label_threshold: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        """A format the data layer knows: "auto" or a registered named format."""
        from unitune.data.validation import format_names

        if v not in format_names():
            raise ValueError(f"unknown format {v!r}; known: {', '.join(format_names())}")
        return v


class DataConfig(Strict):
    sft: DatasetConfig | None = None
    pref: DatasetConfig | None = None
    max_length: int = Field(512, gt=8)
    on_bad_record: Literal["error", "skip"] = "error"
    # processes that tokenize (records go in chunks; 1: in the training process)
    num_proc: int = Field(1, ge=1)
    # keep tokenized datasets on disk (`<cache_dir>/data/`), keyed by source content, tokenizer
    # and options: a rerun or a sweep tokenizes once; false: tokenize every time
    cache: bool = True


class ObjectiveConfig(BaseModel):
    """`name` picks a registered objective; the other keys are its hyper-parameters."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _check_params(self) -> ObjectiveConfig:
        from unitune.objectives import REGISTRY, renamed_problem

        if self.name not in REGISTRY:
            raise ValueError(
                f"unknown objective {self.name!r}; known: {', '.join(sorted(REGISTRY))}"
            )
        renamed = renamed_problem(self.name, self.model_extra or {})
        if renamed:
            raise ValueError(renamed)
        REGISTRY[self.name].params(**(self.model_extra or {}))  # raises on unknown/bad keys
        return self

    def objective(self):  # -> unitune.objectives.Objective
        from unitune.objectives import REGISTRY

        return REGISTRY[self.name]

    def params(self) -> BaseModel:
        from unitune.objectives import REGISTRY

        return REGISTRY[self.name].params(**(self.model_extra or {}))


def _default_objective(slot: str) -> ObjectiveConfig:
    from unitune.objectives import DEFAULT_OBJECTIVE

    return ObjectiveConfig(name=DEFAULT_OBJECTIVE[slot])


class ObjectivesConfig(Strict):
    sft: ObjectiveConfig = Field(default_factory=lambda: _default_objective("sft"))
    pref: ObjectiveConfig = Field(default_factory=lambda: _default_objective("pref"))

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        """`objectives.pref.beta=0.2` alone keeps the slot's default objective."""
        from unitune.objectives import DEFAULT_OBJECTIVE

        if isinstance(data, dict):
            for slot, default in DEFAULT_OBJECTIVE.items():
                if isinstance(data.get(slot), dict) and "name" not in data[slot]:
                    data[slot] = {"name": default, **data[slot]}
        return data

    @field_validator("sft", "pref")
    @classmethod
    def _slot(cls, v: ObjectiveConfig, info: ValidationInfo) -> ObjectiveConfig:
        """Each slot holds an objective of that slot (`objectives.sft: {name: dpo}` is refused)."""
        from unitune.objectives import slot_problem

        problem = slot_problem(v.name, info.field_name)
        if problem:
            raise ValueError(problem)
        return v


class MergeOptions(Strict):
    """How the deltas `d_i = theta_i - theta_base` combine (docs/methods.md, "Merging").

    - `task_arithmetic`: `theta_base + sum_i w_i * d_i`.
    - `ties`: keep each delta's top `density` fraction by magnitude, elect each entry's sign by
      the sign of the summed kept (weighted) values, average the kept values that agree with it.
    - `dare_linear` / `dare_ties`: drop each entry with probability `drop_rate`, rescale the
      survivors by `1 / (1 - drop_rate)` (seeded), then combine as task arithmetic / TIES
      (sign election and disjoint mean, without TIES's magnitude trimming).
    """

    method: str = "ties"  # a row of unitune.merging.methods.METHODS (checked there)
    density: float = Field(0.5, gt=0.0, le=1.0)  # ties: fraction of each delta kept
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0)  # dare: probability of dropping an entry
    seed: int = 0  # dare: the drop masks are drawn from this seed and the tensor's name
    # ties' disjoint mean: over the agreeing models (TIES paper, default) or weighted by their
    # weights (mergekit's `normalize: true`); both equal the plain mean at equal weights of 1
    normalize: Literal["count", "weight"] = "count"


class MergeSource(Strict):
    path: str  # a model directory or LoRA adapter directory (local, or a hub id)
    weight: float = 1.0
    density: float | None = Field(None, gt=0.0, le=1.0)  # ties: overrides the global density
    revision: str | None = None


class MergeConfig(MergeOptions):
    """`unitune merge CONFIG.yaml`: a base and N fine-tuned models into one HF model directory."""

    base: str  # local dir, hub id, builtin:smollm2-135m or builtin:tiny
    revision: str | None = None
    models: list[MergeSource] = Field(min_length=1)
    output: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: the base's dtype
    max_shard_gb: float = Field(5.0, gt=0.0)


class ParallelMerge(MergeOptions):
    """The `parallel` job's merge of its SFT and preference branches."""

    weights: tuple[float, float] = (1.0, 1.0)  # (sft branch, preference branch)


class ParallelConfig(Strict):
    """The `parallel:` section: what the `parallel` job (PAFT, merging/paft.py) adds to its two
    single-objective branches. Read only when `job: parallel`."""

    # L1 penalty on the SFT branch's delta from the base (the preference branch has none)
    l1: float = Field(0.0, ge=0.0)
    # |delta| <= tol counts as zero in the sparsity report; default: the learning rate. With Adam,
    # an L1 subgradient holds an entry within about one step (lr) of 0, not at exactly 0.
    sparsity_tol: float | None = Field(None, ge=0.0)
    merge: ParallelMerge = ParallelMerge()


# schedule keys that moved to the `parallel:` section when `parallel` became a job
MOVED_TO_PARALLEL = ("merge", "sparsity_tol")


def _default_schedule() -> str:
    from unitune.schedules.registry import DEFAULT_SCHEDULE

    return DEFAULT_SCHEDULE


class ScheduleConfig(BaseModel):
    """The `schedule:` section. Keys other than these are the options of the named schedule,
    validated from its constructor's signature (`schedules.register_schedule`), e.g. MAXRIGHT's
    `k` (recompute both gaps every k steps, default 10)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    # a registered schedule (unitune.schedules.registry.SCHEDULES); default:
    # schedules.registry.DEFAULT_SCHEDULE
    name: str = Field(default_factory=lambda: _default_schedule())
    lam: float = Field(0.5, ge=0.0, le=1.0)  # weight / probability of the preference objective
    ideal: Literal["zero", "config", "calibrate"] = "zero"  # where f_sft*, f_pref* come from
    f_sft_star: float | None = None  # optima of the metrics f_sft, f_pref (ideal distance)
    f_pref_star: float | None = None
    # optima of the objectives' own losses (MAXRIGHT's gaps); default: f_sft*, f_pref*, which
    # only an objective whose own loss is the metric may use (Config.own_loss_is_metric)
    loss_sft_star: float | None = None
    loss_pref_star: float | None = None
    calibration_steps: int = Field(50, gt=0)
    # a schedule that trains SFT only: L1 penalty on the delta from the base (PAFT's penalty;
    # the parallel job's SFT branch takes its own from parallel.l1)
    l1: float = Field(0.0, ge=0.0)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        """The keys of the `parallel` schedule, now a job: one line naming where each went."""
        if not isinstance(data, dict):
            return data
        problems = [f"schedule.{k}: moved to parallel.{k}" for k in MOVED_TO_PARALLEL if k in data]
        if data.get("name") == "parallel":
            problems.insert(0, "schedule.name: 'parallel' is a job now: set job: parallel")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _ideal(self) -> ScheduleConfig:
        from unitune.schedules.registry import SCHEDULES

        if self.name not in SCHEDULES:
            known = ", ".join(SCHEDULES)
            raise ValueError(f"unknown schedule {self.name!r}; known: {known} (and job: parallel)")
        options = self.options()
        fields = SCHEDULES[self.name].options.model_fields
        unknown = sorted(set(options) - set(fields))
        if unknown:
            offered = ", ".join(fields) or "none"
            raise ValueError(
                f"{', '.join(unknown)}: not an option of schedule {self.name!r} (its options: "
                f"{offered})"
            )
        SCHEDULES[self.name].options(**options)  # raises on a bad value
        if self.ideal == "config" and (self.f_sft_star is None or self.f_pref_star is None):
            raise ValueError("ideal: config needs both f_sft_star and f_pref_star")
        if self.l1 > 0 and self.slots() != ("sft",):
            sft_only = [n for n, c in SCHEDULES.items() if c.slots == ("sft",)]
            raise ValueError(
                "l1 (an L1 penalty on the SFT delta) needs a schedule that trains SFT only "
                f"({', '.join(sft_only)}); PAFT's is parallel.l1 with job: parallel"
            )
        return self

    def slots(self) -> tuple[str, ...]:
        """The objective slots this schedule trains (its registry entry's `slots`)."""
        from unitune.schedules.registry import SCHEDULES

        return SCHEDULES[self.name].slots

    def options(self) -> dict[str, Any]:
        """The named schedule's own options (the section's extra keys)."""
        return dict(self.model_extra or {})

    def for_schedule(self, name: str, **update: Any) -> ScheduleConfig:
        """This section for schedule `name`: the common keys kept (and `update`d), the options
        of this schedule dropped."""
        common = self.model_dump(exclude=set(self.options()))
        return ScheduleConfig.model_validate({**common, "name": name, **update})


class TrainConfig(Strict):
    max_steps: int = Field(100, gt=0, json_schema_extra=RESUMABLE)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 0
    eval_every: int = Field(10, gt=0, json_schema_extra=RESUMABLE)
    eval_batch_size: int = Field(8, gt=0)
    logprob_chunk_size: int = Field(1024, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory
    # padding-free log-probs: each batch's sequences packed into one row, block-diagonal attention
    # (logprobs.py); pays off with FlashAttention-2 on a GPU. IFT's own forward stays padded.
    packing: bool = False
    # torch.compile (inductor, dynamic shapes) of the decoder for the training passes of SFT and
    # the offline objectives, compiled on a fixed batch at start-up (minutes), then each step is
    # faster (README "Each lever alone"); held-out, reference, online passes and generation eager
    compile: bool = False
    # each step's phases in metrics.jsonl, the run's mean step and memory floor in summary.json
    # and on the console (training/profile.py)
    profile: bool = False
    save_model: bool = Field(True, json_schema_extra=RESUMABLE)
    log_batches: bool = False  # each process's training items per step: batches/rank<r>.jsonl
    # checkpoint every N steps (and on SIGTERM/SIGINT)
    save_every: int | None = Field(None, gt=0, json_schema_extra=RESUMABLE)
    # checkpoints kept (the newest ones)
    keep_last: int = Field(2, gt=0, json_schema_extra=RESUMABLE)
    # a NaN/inf loss or gradient norm
    on_nonfinite: Literal["error", "skip"] = Field("error", json_schema_extra=RESUMABLE)
    # experiment trackers (Accelerate's), every metrics.jsonl line logged to them; their files
    # go under <output_dir>/trackers/ (README, "Trackers")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, json_schema_extra=RESUMABLE
    )
    # after saving, upload <output_dir>/model (with its model card) to this Hugging Face Hub
    # repo, "owner/name" or "name"; the token comes from HF_TOKEN or `hf auth login`
    push_to_hub: str | None = Field(None, json_schema_extra=RESUMABLE)
    # a repo that push_to_hub creates is private
    hub_private: bool = Field(True, json_schema_extra=RESUMABLE)

    @field_validator("report_to")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError(f"a tracker named twice: {v}")
        return v

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        problem = repo_id_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _hub(self) -> TrainConfig:
        if self.push_to_hub is not None and not self.save_model:
            raise ValueError("push_to_hub needs save_model: true (it uploads the saved model)")
        return self


def repo_id_problem(repo_id: str) -> str | None:
    """What is wrong with a Hugging Face Hub model repo id (`owner/name` or `name`), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        return f"{repo_id!r} is not a repo id: expected owner/name (or name)"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].replace(f"'{repo_id}'", "").strip(" :.")
        return f"{repo_id!r} is not a valid repo id ({reason})"
    return None


class EvalConfig(Strict):
    """How held-out figures are measured, the same whatever the objectives (docs/methods.md)."""

    beta: float = Field(0.1, gt=0.0)  # f_pref, reward margin: DPO (or unpaired logistic) at beta
    # generation-based evaluation (unitune.eval.evaluate): generate on held-out prompts and judge
    # them against the references (win rate) at each evaluation
    generate: bool = Field(False, json_schema_extra=RESUMABLE)
    # demo | rm:PATH_OR_ID | openai:MODEL | a registered programmatic judge
    judge: str = Field("demo", json_schema_extra=RESUMABLE)
    # openai: the endpoint's base URL; default OpenAI's
    judge_url: str | None = Field(None, json_schema_extra=RESUMABLE)
    # openai: the environment variable holding the key
    judge_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=RESUMABLE)
    # what the responses are judged against: the held-out references (the paper's win rate) or
    # the starting model's own greedy responses (did training make them better?)
    win_rate_against: Literal["reference", "base"] = Field("reference", json_schema_extra=RESUMABLE)
    # held-out prompts generated on
    generate_samples: int = Field(16, gt=0, json_schema_extra=RESUMABLE)
    max_new_tokens: int = Field(48, gt=0, json_schema_extra=RESUMABLE)
    # lm-eval tasks: unitune_mc, mmlu
    retention_tasks: list[str] = Field(default_factory=list, json_schema_extra=RESUMABLE)
    # documents per retention task
    retention_limit: int | None = Field(None, gt=0, json_schema_extra=RESUMABLE)

    @model_validator(mode="after")
    def _judge(self) -> EvalConfig:
        from unitune.judges.registry import takes_url, url_kinds

        url = takes_url(self.judge)  # raises, naming what is expected
        if self.judge_url is not None:
            if not url:
                raise ValueError(f"judge_url is for an {url_kinds()} judge")
            if not self.judge_url.startswith(("http://", "https://")):
                raise ValueError(f"judge_url {self.judge_url!r}: not an http(s) URL")
        if not self.judge_key_env.strip() or "=" in self.judge_key_env:
            raise ValueError("judge_key_env: the name of an environment variable")
        return self


class RewardConfig(Strict):
    """One reward of `online.rewards` and its weight in the combined reward."""

    reward: str  # module:function, path.py:function, rm:PATH_OR_ID, judge:SPEC, format:RE, length:N
    weight: float = 1.0


class VllmConfig(Strict):
    """`online.generator: vllm`: vLLM in each training process, on its GPU (colocated, as TRL's
    `vllm_mode: colocate`), its weights synchronised from the policy before every generation
    (models/vllm_generator.py; README "Generation on a GPU: vLLM")."""

    # the share of the GPU's memory vLLM takes for its weights and KV cache (TRL colocate: 0.3)
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    # the longest prompt + completion; default: the model's own context length
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)  # sequences decoded at once; default vLLM's
    # vLLM's sleep mode between generations (level 2: weights and KV cache freed while the
    # policy trains; the weights are pushed again before the next generation)
    sleep: bool = False


class OnlineConfig(Strict):
    """Online training of the preference slot (an objective on prompts: una_online, online_dpo,
    grpo, rloo, ...): rollouts sampled by the policy, scored by `rewards`, learned from in the
    same loop (training/online.py; README "Online training"; docs/methods.md)."""

    # the rewards, combined as sum_k weight_k * r_k; a plain string has weight 1
    rewards: list[RewardConfig] = Field(default_factory=list)
    # samples per prompt (G); default: the objective's own (una_online 1, online_dpo 2, grpo 8)
    num_generations: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off
    max_new_tokens: int = Field(64, gt=0)
    # what generates: unitune's decode loop (on a CPU, when generation_dtype is not the
    # policy's, on a packed copy of the policy refreshed before every generation), HF
    # generate on the policy, or vLLM colocated on the GPU (the [vllm] extra; online.vllm)
    generator: Literal["unitune", "hf", "vllm"] = "unitune"
    vllm: VllmConfig = VllmConfig()
    # the decode loop's draw: inverse_cdf (one uniform number per row), or multinomial (HF
    # generate's own draw: the same tokens as generate for the same seed, slower)
    sampler: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"
    # auto: bfloat16 where the run computes in it (mixed_precision bf16), else the model's dtype
    generation_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # a warning when the sampler's log-probs differ from the training pass's by more than this
    # (mean absolute difference per completion token; null: never)
    max_logp_difference: float | None = Field(0.1, ge=0.0, json_schema_extra=RESUMABLE)
    # micro-batches one generation batch is split into (TRL's); default: train.grad_accum
    steps_per_generation: int | None = Field(None, gt=0)
    num_iterations: int = Field(1, gt=0)  # passes over each generation batch (TRL's mu)
    # subtracted from the reward of a completion cut at max_new_tokens (no EOS)
    missing_eos_penalty: float | None = Field(None, ge=0.0)
    reward_clip: tuple[float, float] | None = None  # the combined reward clipped to [lo, hi]
    # the map to [0, 1] of the rewards an objective that fits scores in [0, 1] (una_online)
    # trains on: sigmoid of the raw reward (the UNA authors' code), minmax over score_range
    # (the UNA paper), zscore (running mean and std, then sigmoid); default: sigmoid for such an
    # objective, none for the others
    score_map: Literal["sigmoid", "minmax", "zscore", "none"] | None = None
    score_range: tuple[float, float] | None = None  # minmax's [lo, hi]
    # completions of each generation written to <output_dir>/completions/step-N.jsonl
    log_completions: int = Field(4, ge=0, json_schema_extra=RESUMABLE)
    reward_batch_size: int = Field(8, gt=0)  # reward models score this many texts at once
    # reward models and hub code: off unless turned on
    trust_remote_code: bool = False
    judge_url: str | None = Field(None, json_schema_extra=RESUMABLE)  # judge:openai:... rewards
    judge_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=RESUMABLE)

    @field_validator("rewards", mode="before")
    @classmethod
    def _plain(cls, v: Any) -> Any:
        """`- rm:PATH` is `- {reward: rm:PATH, weight: 1}`."""
        if isinstance(v, list):
            return [{"reward": r} if isinstance(r, str) else r for r in v]
        return v

    @model_validator(mode="after")
    def _ranges(self) -> OnlineConfig:
        for key in ("reward_clip", "score_range"):
            lo_hi = getattr(self, key)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{key}: [lo, hi] needs lo < hi, got {list(lo_hi)}")
        if self.score_map == "minmax" and self.score_range is None:
            raise ValueError("score_map minmax needs score_range: [lo, hi]")
        if self.generator != "vllm" and self.vllm != VllmConfig():
            raise ValueError(
                f"vllm: set, but online.generator is {self.generator!r}; the vllm options are "
                "read only with generator: vllm"
            )
        return self


class Config(Strict):
    name: str | None = Field(None, json_schema_extra=RESUMABLE)
    # train: one run of `schedule` (training/loop.py); parallel: PAFT, an SFT and a preference
    # run from the same base, then merged (merging/paft.py, options in `parallel:`);
    # reward_model: a Bradley-Terry reward model trained on data.pref (training/reward_model.py)
    job: Literal["train", "parallel", "reward_model"] = "train"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    objectives: ObjectivesConfig = ObjectivesConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    online: OnlineConfig = OnlineConfig()
    output_dir: str = Field("runs/run", json_schema_extra=RESUMABLE)
    # default: $UNITUNE_CACHE or ~/.cache/unitune
    cache_dir: str | None = Field(None, json_schema_extra=RESUMABLE)

    @model_validator(mode="after")
    def _data_for_schedule(self) -> Config:
        from unitune.schedules.registry import SCHEDULES, context_of

        if self.job == "parallel":
            return self._parallel_job()
        if self.job == "reward_model":
            return self._reward_model_job()
        for slot in self.schedule.slots():
            if getattr(self.data, slot) is None:
                raise ValueError(f"schedule {self.schedule.name!r} needs data.{slot}")
        self._online()
        self._compile()
        sc = self.schedule
        uses_optima = sc.name in SCHEDULES and "loss_sft_star" in context_of(sc.name)
        if uses_optima and sc.ideal == "config":
            for slot in ("sft", "pref"):
                obj = getattr(self.objectives, slot).name
                if getattr(sc, f"loss_{slot}_star") is None and not self.own_loss_is_metric(slot):
                    raise ValueError(
                        f"schedule.loss_{slot}_star: {sc.name} steps on {obj}'s own loss, which is "
                        f"not f_{slot}; give that loss's optimum (or use ideal: calibrate)"
                    )
        return self

    def _parallel_job(self) -> Config:
        """What PAFT needs: both datasets, and a `schedule:` section that only carries what its
        branches share (lam, the ideal point, calibration); its branches train with the `sft`
        and `pref` schedules, so a per-step schedule of its own would be ignored."""
        from unitune.schedules.registry import DEFAULT_SCHEDULE

        for slot in ("sft", "pref"):
            if getattr(self.data, slot) is None:
                raise ValueError(f"job parallel needs data.{slot}")
        sc = self.schedule
        if sc.name != DEFAULT_SCHEDULE or sc.options():
            raise ValueError(
                f"schedule.name {sc.name!r}: job parallel trains an sft and a pref branch, not a "
                "per-step schedule; leave schedule.name and its options out"
            )
        if self.train.push_to_hub:
            raise ValueError(
                "train.push_to_hub is not supported with job parallel (each branch would "
                "push); push the merged model afterwards with: unitune push RUN_DIR REPO_ID"
            )
        return self

    def _reward_model_job(self) -> Config:
        """What the reward-model job reads: `data.pref` (pairs), `model`, `train` and
        `output_dir` (with `train.push_to_hub`, the model and its card go to the Hub). A section
        it would ignore (SFT data, objectives, a schedule, generation or retention at
        evaluation) is refused rather than silently unused."""
        from unitune.schedules.registry import DEFAULT_SCHEDULE

        job = "job reward_model"
        if self.data.pref is None:
            raise ValueError(f"{job} needs data.pref (preference pairs: prompt, chosen, rejected)")
        if self.data.sft is not None:
            raise ValueError(f"data.sft: {job} trains on data.pref only; leave data.sft out")
        # a saved config.yaml has every section: the default objectives are not a choice
        default = type(self.objectives)().model_dump()
        if "objectives" in self.model_fields_set and self.objectives.model_dump() != default:
            raise ValueError(f"objectives: {job} trains a Bradley-Terry loss; leave it out")
        sc = self.schedule
        if sc.name != DEFAULT_SCHEDULE or sc.options():
            raise ValueError(
                f"schedule.name {sc.name!r}: {job} has no per-step schedule; leave schedule out"
            )
        ev, tc = self.eval, self.train
        unused = [
            key
            for key, on in (
                ("eval.generate", ev.generate),
                ("eval.retention_tasks", bool(ev.retention_tasks)),
                ("train.packing", tc.packing),
                ("train.compile", tc.compile),
                ("train.gradient_checkpointing", tc.gradient_checkpointing),
                ("train.mixed_precision", tc.mixed_precision != "no"),
                ("train.report_to", bool(tc.report_to)),
                ("train.log_batches", tc.log_batches),
            )
            if on
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)}: not supported by {job}")
        return self

    @property
    def is_online(self) -> bool:
        """Whether the preference slot trains online (its objective samples from the policy)."""
        return getattr(self.objectives.pref.objective(), "data", "") == "prompts"

    def num_generations(self) -> int:
        """G: `online.num_generations`, else the preference objective's own default."""
        g = self.online.num_generations
        return (
            g
            if g is not None
            else (getattr(self.objectives.pref.objective(), "generations", None) or 1)
        )

    def steps_per_generation(self) -> int:
        return self.online.steps_per_generation or self.train.grad_accum

    def _compile(self) -> None:
        """`train.compile` compiles the decoder's pass of SFT and the offline objectives; a run
        where nothing takes that pass is refused rather than silently not compiled."""
        if not self.train.compile:
            return
        if self.train.packing:
            raise ValueError("train.compile: not with train.packing (the packed pass runs eager)")
        plain = [
            slot for slot in self.schedule.slots()
            if getattr(self.objectives, slot).objective().forward is None
            and not (slot == "pref" and self.is_online)
        ]  # fmt: skip
        if not plain:
            raise ValueError(
                "train.compile: it compiles the pass of SFT and the offline objectives, and this "
                "run's objectives (IFT, online) each run their own pass: nothing would be compiled"
            )

    def _online(self) -> None:
        """An online preference objective has rewards and whole groups in every micro-batch;
        an `online:` section without one is refused rather than silently unused."""
        if not self.is_online:
            if self.online != OnlineConfig():  # set (a saved config holds the defaults)
                raise ValueError(
                    f"online: objectives.pref {self.objectives.pref.name!r} trains offline; the "
                    "online section is for an objective on prompts (una_online, una_online_pair, "
                    "online_dpo, grpo, rloo)"
                )
            return
        on, g, pref = self.online, self.num_generations(), self.objectives.pref.name
        if not on.rewards:
            raise ValueError(
                f"online.rewards: {pref} needs at least one reward (rm:PATH, module:function, "
                "path.py:function, judge:SPEC, format:REGEX, length:N)"
            )
        if self.train.batch_size % g:
            raise ValueError(
                f"train.batch_size {self.train.batch_size}: it counts completions and must be a "
                f"multiple of online.num_generations ({g}: {pref}'s groups stay whole)"
            )
        minimum = getattr(self.objectives.pref.objective(), "min_generations", 1)
        if g < minimum:
            raise ValueError(
                f"online.num_generations {g}: {pref} compares samples of a prompt; it needs "
                f"at least {minimum}"
            )
        if self.train.packing:
            raise ValueError("train.packing: not supported with an online objective")

    def own_loss_is_metric(self, slot: str) -> bool:
        """Whether the objective of `slot` trains on exactly the held-out metric `f_<slot>` (its
        registry entry's `metric`, at `beta == eval.beta` when it has a beta)."""
        if slot == "pref" and self.is_online:  # its f_pref: minus the held-out mean reward
            return True
        obj = getattr(self.objectives, slot)
        return obj.objective().equals_metric(obj.params(), self.eval.beta)

    def own_loss_key(self, slot: str) -> str:
        """The eval key holding the held-out value of `slot`'s own objective."""
        obj = getattr(self.objectives, slot).name
        return f"f_{slot}" if self.own_loss_is_metric(slot) else f"loss_{obj}"


class ConfigError(ValueError):
    pass


def _format_errors(err: ValidationError, source: str) -> str:
    """One line per error, naming its key's dotted path; a single error is one line in all."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    if len(lines) == 1:
        return f"{source}: invalid config: {lines[0]}"
    return "\n  ".join([f"{source}: invalid config", *lines])


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _read_yaml(path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """The mapping of the YAML file `path`, `overrides` applied; every failure a ConfigError that
    names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the config as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    return parse_config(_read_yaml(path, overrides), str(path))


def load_merge_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """The YAML of `unitune merge`; unknown keys are errors naming their dotted path."""
    path = Path(path)
    return parse_merge_config(_read_yaml(path, overrides), str(path))


def parse_merge_config(data: dict[str, Any], source: str = "merge config") -> MergeConfig:
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
