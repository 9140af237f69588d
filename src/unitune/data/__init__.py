"""The data layer: read, validate and tokenize SFT, preference-pair and unpaired feedback data,
and the prompts of online training; batch and collate it.

See `unitune.data.tokenize` for the truncation policy and `unitune.data.validation` for the
accepted formats.
"""

from unitune.data.collate import collate, length_batches
from unitune.data.errors import DataError, DataReport, format_unused
from unitune.data.holdout import split_holdout
from unitune.data.load import (
    detect_feedback_kind,
    detect_kind,
    load_feedback,
    load_preference,
    load_sft,
)
from unitune.data.prompts import PromptItem, load_prompt_data
from unitune.data.sequences import (
    Feedback,
    Pair,
    Sequence,
    data_fingerprint,
    feedback_kind,
    mismatched,
)
from unitune.data.store import Items, TokenStore

__all__ = [
    "DataError",
    "DataReport",
    "Items",
    "TokenStore",
    "Feedback",
    "Pair",
    "PromptItem",
    "Sequence",
    "collate",
    "data_fingerprint",
    "detect_feedback_kind",
    "detect_kind",
    "feedback_kind",
    "format_unused",
    "length_batches",
    "load_feedback",
    "load_preference",
    "load_prompt_data",
    "load_sft",
    "mismatched",
    "split_holdout",
]
