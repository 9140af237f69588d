"""Objectives: pure loss functions on log-probs, registered by name."""

from unitune.objectives.preference import dpo
from unitune.objectives.registry import REGISTRY, Objective, register
from unitune.objectives.sft import sft
from unitune.objectives.types import PairLogps, SeqLogps

register(sft, name="sft", kind="sft", needs_ref=False, source="standard")
register(dpo, name="dpo", kind="pref", needs_ref=True, source="DPO, arXiv 2305.18290")

__all__ = ["REGISTRY", "Objective", "PairLogps", "SeqLogps", "register"]
