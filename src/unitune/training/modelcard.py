"""The model card (`README.md`) written into a saved model directory, in the Hugging Face
convention: YAML front matter (`base_model`, `library_name`, `license` when known, `tags`,
`datasets`), then what was trained and how: base model, data, schedule, objectives and their
parameters, `lam`, seed, steps, the final held-out metrics, how to load it, the unitune version.

`model_card(cfg, summary)` is the text (from the config and the run's summary.json);
`write_model_card(model_dir, cfg, summary)` writes it atomically. Local paths appear by their file
name only, and every secret is redacted (`redact.py`).
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


def model_card(cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None) -> str:
    """The model card of a run: `cfg` is its config, `summary` its summary.json. `repo_id` (or
    `train.push_to_hub`) is named in the loading example; else the local model directory."""
    tc, sc = cfg.train, cfg.schedule
    adapter = cfg.model.lora is not None and not cfg.model.lora.merge_on_save
    base, license_ = base_model(cfg)
    slots = _slots(cfg)
    objectives = [getattr(cfg.objectives, s).name for s in slots]
    data = {s: getattr(cfg.data, s) for s in slots if getattr(cfg.data, s) is not None}
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    if license_:
        meta["license"] = license_
    schedule = _schedule(cfg)
    tags = ["unitune", *objectives, schedule] + (["lora"] if cfg.model.lora else [])
    meta["tags"] = list(dict.fromkeys(tags))
    meta["datasets"] = list(dict.fromkeys(_display(d.train) for d in data.values()))
    meta["pipeline_tag"] = "text-generation"

    title = summary.get("name") or cfg.name or schedule
    shown = _display(cfg.model.name)
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{shown}`"
    if cfg.model.revision:
        base_text += f" (revision `{cfg.model.revision}`)"
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
    if cfg.model.lora:
        lo = cfg.model.lora
        lines.append(f"| LoRA | r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, "
                     f"modules {', '.join(lo.target_modules)} |")  # fmt: skip
    if cfg.job == "parallel":
        pm = cfg.parallel.merge
        lines.append(f"| merge | {pm.method} (weights {list(pm.weights)}) |")
    lines += ["", "## Data", "", "| slot | training data | training records | held out |",
              "|---|---|---|---|"]  # fmt: skip
    for slot, d in data.items():
        rep = summary.get("data", {}).get(slot, {})
        held = _display(d.eval) if d.eval else f"{d.eval_fraction:g} of the training data"
        split = f" (split `{d.split}`)" if not _is_local(d.train) else ""
        lines.append(f"| {slot} | `{_display(d.train)}`{split} | {rep.get('train', '')} | {held} "
                     f"({rep.get('eval', '')}) |")  # fmt: skip
    final = summary.get("final", {})
    measures = summary.get("measures", {})
    lines += ["", f"## Final metrics (held-out, step {final.get('step', tc.max_steps)})", "",
              "| metric | value | what |", "|---|---|---|"]  # fmt: skip
    for k, v in final.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS:
            lines.append(f"| {k} | {_num(v)} | {measures.get(k, '')} |")
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
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    text = f"---\n{head}---\n\n" + "\n".join(lines)
    return redact(text.replace(str(Path.home()), "~"))


def write_model_card(
    model_dir: str | Path, cfg: Config, summary: dict[str, Any], *, repo_id: str | None = None
) -> Path:
    """`model_dir/README.md` (replacing peft's), written atomically; returns its path."""
    path = Path(model_dir) / "README.md"
    atomic_write(path, model_card(cfg, summary, repo_id=repo_id))
    return path


def card_from_run(run_dir: str | Path, *, repo_id: str | None = None) -> str | None:
    """The model card of a finished run directory (its config.yaml and summary.json), or None
    when it has not both."""
    from unitune.config import load_config

    run_dir = Path(run_dir)
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()):
        return None
    cfg = load_config(run_dir / "config.yaml")
    return model_card(cfg, json.loads((run_dir / "summary.json").read_text()), repo_id=repo_id)
