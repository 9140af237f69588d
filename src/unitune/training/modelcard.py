"""The model card (`README.md`) written into a saved model directory, in the Hugging Face
convention: YAML front matter (`base_model`, `library_name`, `license` when known, `tags`,
`datasets`), then what was trained and how: base model, data, schedule, objectives and their
parameters, `lam`, seed, steps, the final held-out metrics, how to load it, the unitune version.

`model_card(cfg, summary)` is the text (from the config and the run's summary.json);
`reward_model_card(cfg, summary)` that of a `reward_model` run (a Bradley-Terry reward model:
`text-classification`, scored with `AutoModelForSequenceClassification`, used as `rm:PATH`);
`card_for` picks by `cfg.job` and `write_model_card(model_dir, cfg, summary)` writes it
atomically. Local paths appear by their file name only, and every secret is redacted
(`redact.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

import unitune
from unitune.config import Config
from unitune.core.io import atomic_write
from unitune.core.redact import redact

# the builtin models: (hub id of what they are, license) - builtin:tiny is a random model
BUILTIN_BASES = {"builtin:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
# fields of an eval line that are not metrics: wall-clock times, step counts (in "Training")
NOT_METRICS = ("step", "eval_s", "elapsed_s", "steps_sft", "steps_pref")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")


def _is_local(name: str) -> bool:
    """Whether a model or data name is a local path rather than a hub id."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or name.endswith(_DATA_SUFFIXES)
        or not _HUB_ID.match(name)
    )


def _display(name: str) -> str:
    """A hub id as it is; a local path by its last component (no home or absolute paths)."""
    if not _is_local(name):
        return name
    return Path(name.rstrip("/\\")).name or name


def base_model(cfg: Config) -> tuple[str | None, str | None]:
    """(hub id of the base model or None when it has none, its license when known)."""
    name = cfg.model.name
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name]
    if name.startswith("builtin:") or _is_local(name):
        return None, _local_license(Path(name).expanduser())
    return name, None


def _local_license(path: Path) -> str | None:
    """The `license` of a local model directory's own model card, if it has one."""
    meta = front_matter((path / "README.md").read_text()) if (path / "README.md").is_file() else {}
    lic = meta.get("license")
    return lic if isinstance(lic, str) else None


def front_matter(text: str) -> dict[str, Any]:
    """A model card's YAML front matter (`{}` when it has none or it does not parse)."""
    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    try:
        meta = yaml.safe_load(m.group(1)) if m else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _local_model(output_dir: str) -> str:
    """The saved model's directory as the loading example names it: the config's relative
    `output_dir` as it is, an absolute one by its last component."""
    out = Path(output_dir)
    return f"{out.as_posix()}/model" if not out.is_absolute() else f"path/to/{out.name}/model"


def _slots(cfg: Config) -> list[str]:
    """The objective slots this run trained."""
    return {"sft": ["sft"], "pref": ["pref"]}.get(_schedule(cfg), ["sft", "pref"])


def _schedule(cfg: Config) -> str:
    """The schedule the card names: the per-step schedule, or `parallel` for that job."""
    return "parallel" if cfg.job == "parallel" else cfg.schedule.name


def _params(cfg: Config, slot: str) -> str:
    obj = getattr(cfg.objectives, slot)
    params = obj.params().model_dump()
    return f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _front(cfg: Config, library: str, tags: list[str], data: list[Any], pipeline: str) -> dict:
    """The card's YAML front matter: base_model and license when known, the library, the tags
    (each once), the training data by name, the pipeline tag."""
    base, license_ = base_model(cfg)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = library
    if license_:
        meta["license"] = license_
    meta["tags"] = list(dict.fromkeys(tags))
    meta["datasets"] = list(dict.fromkeys(_display(d.train) for d in data))
    meta["pipeline_tag"] = pipeline
    return meta


def _base_text(cfg: Config) -> str:
    """The base model as the card's text names it: a link to its hub page, else its name."""
    base, _ = base_model(cfg)
    text = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{_display(cfg.model.name)}`"
    return text + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")


def _lora_row(cfg: Config, merged: bool = False) -> list[str]:
    """The training table's LoRA row (none for full fine-tuning)."""
    lo = cfg.model.lora
    if lo is None:
        return []
    merge = ", merged into the saved weights" if merged else ""
    mods = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    return [f"| LoRA | r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, "
            f"modules {mods}{merge} |"]  # fmt: skip


def _data_rows(cfg: Config, slots: list[str], summary: dict[str, Any]) -> list[str]:
    """One row per dataset: its name (a hub dataset with its split), the records kept for
    training, the held-out set and its records (from summary.json's `data`)."""
    rows = []
    for slot in slots:
        d = getattr(cfg.data, slot)
        if d is None:
            continue
        rep = summary.get("data", {}).get(slot, {})
        held = _display(d.eval) if d.eval else f"{d.eval_fraction:g} of the training data"
        split = f" (split `{d.split}`)" if not _is_local(d.train) else ""
        rows.append(f"| {slot} | `{_display(d.train)}`{split} | {rep.get('train', '')} | {held} "
                    f"({rep.get('eval', '')}) |")  # fmt: skip
    return rows


def _metrics_rows(final: dict[str, Any], what: dict[str, str]) -> list[str]:
    """One row per numeric metric of the final eval line (not its step count or times)."""
    return [
        f"| {k} | {_num(v)} | {what.get(k, '')} |"
        for k, v in final.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS
    ]


def _render(meta: dict[str, Any], lines: list[str]) -> str:
    """Front matter and body, the home directory shown as `~` and every secret redacted."""
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    text = f"---\n{head}---\n\n" + "\n".join(lines)
    return redact(text.replace(str(Path.home()), "~"))


def model_card(cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None) -> str:
    """The model card of a run: `cfg` is its config, `summary` its summary.json. `repo_id` (or
    `train.push_to_hub`) is named in the loading example; else the local model directory."""
    tc, sc = cfg.train, cfg.schedule
    adapter = cfg.model.lora is not None and not cfg.model.lora.merge_on_save
    slots = _slots(cfg)
    objectives = [getattr(cfg.objectives, s).name for s in slots]
    data = [getattr(cfg.data, s) for s in slots if getattr(cfg.data, s) is not None]
    schedule = _schedule(cfg)
    tags = ["unitune", *objectives, schedule] + (["lora"] if cfg.model.lora else [])
    meta = _front(cfg, "peft" if adapter else "transformers", tags, data, "text-generation")

    title = summary.get("name") or cfg.name or schedule
    base_text = _base_text(cfg)
    kinds = " and ".join(f"`{o}`" for o in objectives)
    lines = [
        f"# {title}",
        "",
        f"{'A LoRA adapter for' if adapter else 'Post-trained from'} {base_text} with "
        f"unitune {unitune.__version__}: {kinds} "
        f"{'jointly ' if schedule not in ('sft', 'pref', 'sequential', 'parallel') else ''}"
        f"under the `{schedule}` schedule.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_text} |",
        f"| schedule | `{schedule}`"
        + (f" ({', '.join(f'{k}={v}' for k, v in sc.options().items())})" if sc.options() else "")
        + " |",
        f"| lam (weight of the preference objective) | {sc.lam} |",
    ]
    for slot in slots:
        label = "SFT objective" if slot == "sft" else "preference objective"
        name = getattr(cfg.objectives, slot).name
        lines.append(f"| {label} | `{name}`{_params(cfg, slot)} |")
    steps = summary.get("steps", {})
    lines += [
        f"| seed | {tc.seed} |",
        f"| steps | {tc.max_steps} (sft: {steps.get('sft', 0)}, pref: {steps.get('pref', 0)}) |",
        f"| batch | {summary.get('global_batch', tc.batch_size * tc.grad_accum)} per step "
        f"({tc.batch_size} per process, grad_accum {tc.grad_accum}) |",
        f"| learning rate | {tc.lr:g} ({tc.lr_schedule}, warmup {tc.warmup_steps}) |",
        f"| max_length | {cfg.data.max_length} |",
        f"| precision | weights {cfg.model.dtype}, mixed precision {tc.mixed_precision} |",
    ]
    lines += _lora_row(cfg)
    if cfg.job == "parallel":
        pm = cfg.parallel.merge
        lines.append(f"| merge | {pm.method} (weights {list(pm.weights)}) |")
    lines += ["", "## Data", "", "| slot | training data | training records | held out |",
              "|---|---|---|---|"]  # fmt: skip
    lines += _data_rows(cfg, slots, summary)
    final = summary.get("final", {})
    measures = summary.get("measures", {})
    lines += ["", f"## Final metrics (held-out, step {final.get('step', tc.max_steps)})", "",
              "| metric | value | what |", "|---|---|---|"]  # fmt: skip
    lines += _metrics_rows(final, measures)
    where = repo_id or tc.push_to_hub or _local_model(cfg.output_dir)
    if adapter:
        load = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        ]
    else:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        ]
    lines += ["", "## How to load", "", "```python", *load, "```", "",
              f"Trained with unitune {unitune.__version__}.", ""]  # fmt: skip
    return _render(meta, lines)


# what the reward-model job's held-out figures are (`training/reward_model.evaluate`)
REWARD_MEASURES = {
    "loss": "Bradley-Terry loss, mean of -log sigmoid(r_chosen - r_rejected)",
    "accuracy": "pairwise accuracy: fraction of pairs with r_chosen > r_rejected",
    "margin": "mean of r_chosen - r_rejected",
    "pairs": "held-out pairs scored",
}


def reward_model_card(cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None) -> str:
    """The model card of a `reward_model` run: a Bradley-Terry reward model (Bradley & Terry
    1952; the reward model of Ouyang et al. 2022, eq. 1; TRL's `RewardTrainer`), saved as a
    plain `AutoModelForSequenceClassification` with one output, LoRA merged. `summary` is the
    run's summary.json; `repo_id` (or `train.push_to_hub`) is named in the examples, else the
    local model directory."""
    tc = cfg.train
    pref = cfg.data.pref
    tags = ["unitune", "reward-model", "bradley-terry"] + (["lora"] if cfg.model.lora else [])
    meta = _front(cfg, "transformers", tags, [pref] if pref else [], "text-classification")
    title = summary.get("name") or cfg.name or "reward model"
    base_text = _base_text(cfg)
    data = f" on the preference pairs of `{_display(pref.train)}`" if pref else ""
    lines = [
        f"# {title}",
        "",
        f"A Bradley-Terry reward model trained from {base_text} with unitune "
        f"{unitune.__version__}{data}. It is a sequence classifier with one output: the score "
        "of a conversation (read at its last token); a higher score means a more preferred "
        "response. Trained on the loss -log sigmoid(r_chosen - r_rejected) over each pair's "
        "chosen and rejected conversations, as TRL's `RewardTrainer`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_text} |",
        "| objective | Bradley-Terry, -log sigmoid(r_chosen - r_rejected) |",
        f"| seed | {tc.seed} |",
        f"| steps | {summary.get('steps', {}).get('reward_model', tc.max_steps)} |",
        f"| batch | {summary.get('global_batch', tc.batch_size * tc.grad_accum)} pairs per step "
        f"({tc.batch_size} per process, grad_accum {tc.grad_accum}) |",
        f"| learning rate | {tc.lr:g} ({tc.lr_schedule}, warmup {tc.warmup_steps}) |",
        f"| max_length | {cfg.data.max_length} |",
        f"| precision | weights {cfg.model.dtype}, mixed precision {tc.mixed_precision} |",
        *_lora_row(cfg, merged=True),
        "",
        "## Data",
        "",
        "| slot | training data | training pairs | held-out pairs |",
        "|---|---|---|---|",
        *_data_rows(cfg, ["pref"], summary),
    ]
    final = summary.get("final", {})
    lines += ["", f"## Final metrics (held-out, step {final.get('step', tc.max_steps)})", "",
              "| metric | value | what |", "|---|---|---|",
              *_metrics_rows(final, REWARD_MEASURES)]  # fmt: skip
    where = repo_id or tc.push_to_hub or _local_model(cfg.output_dir)
    score = [
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{where}").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "",
        "messages = [",
        '    {"role": "user", "content": "Describe a cat."},',
        '    {"role": "assistant", "content": "A cat is a small, curious animal."},',
        "]",
        "text = tokenizer.apply_chat_template(messages, tokenize=False)",
        'inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)',
        "with torch.no_grad():",
        "    score = model(**inputs).logits[0, 0].item()  # higher = preferred",
    ]
    lines += [
        "", "## How to score", "",
        "The conversation is rendered with the tokenizer's chat template, as unitune's `rm:` "
        "rewards and judges read it (a tokenizer without one: the prompt and the response on "
        "separate lines, with the tokenizer's special tokens).", "",
        "```python", *score, "```", "",
        "## Use in unitune", "",
        "As the reward of online training, and as the judge of generation-based evaluation:", "",
        "```yaml", "online:", "  rewards:", f"    - rm:{where}", "eval:", f"  judge: rm:{where}",
        "```", "",
        f"Trained with unitune {unitune.__version__}.", "",
    ]  # fmt: skip
    return _render(meta, lines)


def card_for(cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None) -> str:
    """The card of the run's job: `reward_model_card` for a reward model, else `model_card`."""
    card = reward_model_card if cfg.job == "reward_model" else model_card
    return card(cfg, summary, repo_id=repo_id)


def write_model_card(
    model_dir: str | Path, cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None
) -> Path:
    """`model_dir/README.md` (replacing peft's), the card of the run's job, written atomically;
    returns its path."""
    path = Path(model_dir) / "README.md"
    atomic_write(path, card_for(cfg, summary, repo_id=repo_id))
    return path


def card_from_run(run_dir: str | Path, *, repo_id: str | None = None) -> str | None:
    """The model card of a finished run directory (its config.yaml and summary.json), or None
    when it has not both."""
    from unitune.config import load_config

    run_dir = Path(run_dir)
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()):
        return None
    cfg = load_config(run_dir / "config.yaml")
    return card_for(cfg, json.loads((run_dir / "summary.json").read_text()), repo_id=repo_id)
