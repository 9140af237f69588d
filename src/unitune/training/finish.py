"""The end of a run: the trained model saved (gathered from a sharding engine's processes), its
model card, `summary.json`, and the upload to the Hugging Face Hub (`train.push_to_hub`)."""

from __future__ import annotations

import json

from torch import nn

from unitune.core.io import atomic_write
from unitune.models.save import save_model
from unitune.training.hub import push_model
from unitune.training.modelcard import write_model_card
from unitune.training.session import Session


def finish(session: Session, module: nn.Module, summary: dict) -> None:
    """Save the model of `module` (with `train.save_model`) and its model card, write
    `summary.json`, and push the model (with `train.push_to_hub`; a failure is a `HubError`,
    the model kept here). Every process calls it; files come from the main one."""
    cfg, acc, out = session.cfg, session.acc, session.out
    tc = cfg.train
    if tc.save_model:
        # FSDP / ZeRO-3: the weights gathered from every process onto the main one
        full = acc.get_state_dict(module) if session.engine.shards_parameters else None
        if session.main:
            merge = bool(cfg.model.lora and cfg.model.lora.merge_on_save)
            weights = {k.removeprefix("model."): v for k, v in full.items()} if full else None
            save_model(acc.unwrap_model(module).model, session.tokenizer, out / "model",
                       merge_lora=merge, state_dict=weights)  # fmt: skip
            write_model_card(out / "model", cfg, summary)  # README.md, beside the weights
    if session.main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    acc.wait_for_everyone()
    if tc.push_to_hub and tc.save_model and session.main:
        url = push_model(out / "model", tc.push_to_hub, private=tc.hub_private, run_dir=out)
        session.console.log(f"pushed {out / 'model'} to {url}")
