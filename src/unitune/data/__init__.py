"""The data layer: read, validate and tokenize SFT and preference data; batch and collate it.

See `unitune.data.tokenize` for the truncation policy and `unitune.data.validation` for the
accepted formats.
"""

from unitune.data.collate import collate, length_batches
from unitune.data.errors import DataError, DataReport
from unitune.data.holdout import split_holdout
from unitune.data.load import load_preference, load_sft
from unitune.data.sequences import Pair, Sequence, data_fingerprint

__all__ = [
    "DataError",
    "DataReport",
    "Pair",
    "Sequence",
    "collate",
    "data_fingerprint",
    "length_batches",
    "load_preference",
    "load_sft",
    "split_holdout",
]
