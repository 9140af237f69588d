"""The datasets of a run: loaded by the data kind each objective needs, and batched.

Three kinds of items flow through a run: `Sequence` (demonstrations), `Pair` (preference pairs)
and `Feedback` (unpaired feedback with a label or a score). Every kind flattens to a list of
`Sequence`s for the model: pairs as all chosen, then all rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from unitune.config import Config, DatasetConfig
from unitune.core.io import cache_dir
from unitune.data import (
    DataError,
    DataReport,
    Feedback,
    Items,
    Pair,
    Sequence,
    collate,
    detect_feedback_kind,
    detect_kind,
    length_batches,
    load_feedback,
    load_preference,
    load_prompt_data,
    load_sft,
    mismatched,
    split_holdout,
)
from unitune.data.validation import NAMED_FORMATS
from unitune.objectives import REGISTRY


@dataclass
class Split:
    kind: str  # "demonstrations" | "pairs" | "unpaired"
    train: list
    eval: list
    report: DataReport | None = None
    eval_report: DataReport | None = None
    notes: list[str] = field(default_factory=list)


def unpair(pairs: list[Pair]) -> list[Feedback]:
    """Pairs as unpaired feedback: chosen desirable (1.0), rejected undesirable (0.0).

    As TRL's `unpair_preference_dataset`, so that KTO and UNA's binary form train on pair data.
    """
    if isinstance(pairs, Items):
        return pairs.unpaired()
    out = []
    for p in pairs:
        for seq, target in ((p.chosen, 1.0), (p.rejected, 0.0)):
            out.append(Feedback(seq, target, seq.target_mask.index(1)))
    return out


def load_data(cfg: Config, tokenizer) -> dict[str, Split]:
    """Load, validate and tokenize every dataset before training starts.

    The preference slot is read as pairs or as unpaired feedback according to what its objective
    needs; pair data given to an unpaired objective is unpaired (chosen → desirable). Score data
    given to an objective that needs labels (kto, una_binary) is a `DataError` at the source's
    'score' field, checked before anything is tokenized, unless `data.pref.label_threshold` turns
    the scores into labels. `format` is for data.sft, `label_threshold` for data.pref.
    """
    out: dict[str, Split] = {}
    common = {
        "max_length": cfg.data.max_length,
        "on_bad_record": cfg.data.on_bad_record,
        "num_proc": cfg.data.num_proc,
        "cache_dir": cache_dir(cfg.cache_dir) if cfg.data.cache else None,
    }
    for slot in ("sft", "pref"):
        dcfg = getattr(cfg.data, slot)
        if dcfg is None:
            continue
        obj = REGISTRY[getattr(cfg.objectives, slot).name]
        kw = dict(common, split=dcfg.split, columns=dcfg.columns)
        kind, notes = obj.data, []
        if kind == "prompts":  # an online objective samples from prompts
            out[slot] = _prompt_split(cfg, dcfg, tokenizer)
            continue
        named = NAMED_FORMATS.get(dcfg.format)  # a format asked for by name, else detected
        if named is not None and named.kind != ("demonstrations" if slot == "sft" else "pairs"):
            detail = f"data.{slot}.format: {dcfg.format} is {named.slot_format}"
            if slot == "pref":
                detail += "; unpaired feedback is detected from its keys"
            raise DataError(dcfg.train, None, None, detail)
        if slot == "sft":
            if dcfg.label_threshold is not None:
                detail = (
                    "data.sft.label_threshold: only unpaired preference scores (data.pref) have one"
                )
                raise DataError(dcfg.train, None, None, detail)
            loader = load_sft
            kw["format"] = dcfg.format
        else:
            if named is not None:
                found, kw["format"] = "pairs", dcfg.format
            else:
                found = detect_kind(dcfg.train, split=dcfg.split, columns=dcfg.columns)
            if obj.data == "pairs" and found == "unpaired":
                raise DataError(
                    dcfg.train, None, None,
                    f"objective {obj.name!r} needs preference pairs (prompt, chosen, rejected), "
                    "but this holds unpaired feedback (label or score)",
                )  # fmt: skip
            if found == "pairs":
                loader = load_preference
            else:
                loader = load_feedback
                kw["score_range"] = dcfg.score_range
                kw["label_threshold"] = dcfg.label_threshold
                if obj.needs_labels and dcfg.label_threshold is None:
                    _refuse_scores(obj.name, dcfg)
        train, held, report, eval_report = _train_and_held(loader, dcfg, tokenizer, cfg, kw)
        if kind == "unpaired" and len(train) and isinstance(train[0], Pair):
            train, held = unpair(train), unpair(held)
            notes.append(f"pairs unpaired for {obj.name}: chosen desirable, rejected undesirable")
        out[slot] = Split(kind, train, held, report, eval_report, notes)
    return out


def _prompt_split(cfg: Config, dcfg: DatasetConfig, tokenizer) -> Split:
    """The prompts of an online preference slot (`load_prompt_data`), held out from `eval` or
    `eval_fraction` and cut to `max_samples` / `eval_max_samples` as the other kinds are.

    Prompts longer than `data.max_length - online.max_new_tokens` are skipped and counted in the
    reports. Prompt data is not kept in the tokenized-data cache (`data.cache` is for the
    offline kinds). Options that only offline preference data has are refused.
    """
    for key, why in (
        ("score_range", "online.score_range maps the rewards"),
        ("label_threshold", "the rewards are computed online (online.rewards)"),
    ):
        if getattr(dcfg, key) is not None:
            detail = f"data.pref.{key}: prompt data has no scores or labels; {why}"
            raise DataError(dcfg.train, None, None, detail)
    if dcfg.format != "auto":
        detail = (
            f"data.pref.format: {dcfg.format} is not read by an objective on prompts; prompt "
            "records (prompt, messages or preference pairs) are detected from their keys"
        )
        raise DataError(dcfg.train, None, None, detail)
    kw = {
        "split": dcfg.split,
        "columns": dcfg.columns,
        "max_length": cfg.data.max_length,
        "max_new_tokens": cfg.online.max_new_tokens,
        "on_bad_record": cfg.data.on_bad_record,
        "num_proc": cfg.data.num_proc,
    }
    train, held, report, eval_report = _train_and_held(load_prompt_data, dcfg, tokenizer, cfg, kw)
    return Split("prompts", train, held, report, eval_report)


def _train_and_held(loader, dcfg: DatasetConfig, tokenizer, cfg: Config, kw: dict) -> tuple:
    """(train, held out, train report, eval report) of one dataset read by `loader`: held out
    from `eval` or `eval_fraction`, then cut to `max_samples` / `eval_max_samples`."""
    train, report = loader(dcfg.train, tokenizer, **kw)
    if dcfg.eval is not None:
        held, eval_report = loader(dcfg.eval, tokenizer, **kw)
    else:
        train, held = split_holdout(train, dcfg.eval_fraction, cfg.train.seed)
        eval_report = None
    if dcfg.max_samples is not None:
        train = train[: dcfg.max_samples]
    if dcfg.eval_max_samples is not None:
        held = held[: dcfg.eval_max_samples]
    return train, held, report, eval_report


def _refuse_scores(objective: str, dcfg: DatasetConfig) -> None:
    """Score data for an objective that needs labels: an error naming the file and field."""
    for source in (dcfg.train, dcfg.eval):
        if source is not None and detect_feedback_kind(source, dcfg.split, dcfg.columns) == "score":
            raise DataError(
                source, None, "score",
                f"{objective} needs labels; data.pref has scores: set data.pref.label_threshold: "
                "T to turn score >= T (after mapping to [0, 1]) into desirable",
            )  # fmt: skip


def flatten(items: list) -> list[Sequence]:
    """Sequences of a dataset: demonstrations as they are; pairs as all chosen, then rejected;
    feedback as its completions."""
    if isinstance(items, Items):
        return items.sequences()
    if not items:
        return []
    if isinstance(items[0], Pair):
        return [p.chosen for p in items] + [p.rejected for p in items]
    if isinstance(items[0], Feedback):
        return [f.seq for f in items]
    return list(items)


def item_length(item) -> int:
    if hasattr(item, "prompt_ids"):  # a prompt of the online slot (`data.prompts.PromptItem`)
        return len(item.prompt_ids)
    if isinstance(item, Pair):
        return max(len(item.chosen.input_ids), len(item.rejected.input_ids))
    if isinstance(item, Feedback):
        return len(item.seq.input_ids)
    return len(item.input_ids)


class BatchStream:
    """Endless stream of index batches grouped by length, reshuffled every epoch.

    Epoch `e`'s order is a pure function of `seed + e`; the epochs, one after another, are one
    sequence of batches. Process `rank` of `world` takes every `world`-th of them, starting at its
    rank, so the processes see disjoint batches and together exactly the batches one process
    would draw in `world` micro-steps. The stream's whole state is how many batches it has drawn:
    `state_dict()` / `load_state_dict()` resume it at the very next batch.
    With a fixed `partition` (unpaired data: KTO's mismatched pairs are built per batch and their
    reference log-probs cached), the same batches come back every epoch in a new order.
    """

    def __init__(
        self,
        items: list,
        batch_size: int,
        seed: int,
        partition: list[list[int]] | None = None,
        *,
        rank: int = 0,
        world: int = 1,
    ):
        if isinstance(items, Items):
            self.lengths = items.lengths().tolist()
        else:
            self.lengths = [item_length(it) for it in items]
        self.batch_size, self.seed, self.partition = batch_size, seed, partition
        self.rank, self.world, self.drawn = rank, world, 0
        self.epoch = 0
        self._order = self._epoch_order()
        self._per_epoch = len(self._order)

    def _epoch_order(self) -> list[list[int]]:
        seed = self.seed + self.epoch
        if self.partition is None:
            return length_batches(self.lengths, self.batch_size, seed=seed, shuffle=True)
        g = torch.Generator().manual_seed(seed)
        return [self.partition[i] for i in torch.randperm(len(self.partition), generator=g)]

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        epoch, position = divmod(self.drawn * self.world + self.rank, self._per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._order = self._epoch_order()
        self.drawn += 1
        return self._order[position]

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = int(state["drawn"])


def collate_items(items: list, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    seqs = flatten([items[i] for i in idx])
    return {k: v.to(device) for k, v in collate(seqs, pad_id).items()}


@dataclass
class KLPairs:
    """KTO's mismatched (prompt_i, completion_{i+1}) sequences of every batch of a fixed
    partition, flattened in batch order; `offset[batch]` is where a batch's pairs start.
    The batch's figure is the KL estimate `z = max(0, mean r)` (TRL's KTO)."""

    seqs: list[Sequence]
    offset: dict[tuple[int, ...], int]

    @classmethod
    def build(cls, items: list[Feedback], partition: list[list[int]]) -> KLPairs:
        seqs: list[Sequence] = []
        offset = {}
        for batch in partition:
            offset[tuple(batch)] = len(seqs)
            seqs += mismatched(items, batch)
        return cls(seqs, offset)

    def rows(self, batch: list[int]) -> slice:
        start = self.offset[tuple(batch)]
        return slice(start, start + len(batch))

    @staticmethod
    def figure(ratio: torch.Tensor) -> float:
        return float(ratio.mean().clamp(min=0))


# Auxiliary inputs an objective can declare (`register(..., inputs=(name,))`), served here: built
# per split over a fixed partition of its batches (`build(items, batches)`), with `seqs` (scored
# under no grad by the policy, and by the reference, cached), `rows(batch)` (a batch's slice of
# `seqs`) and `figure(ratio)` (one number logged per batch and reported on held-out data).
AUX_INPUTS: dict[str, type] = {"kl": KLPairs}
