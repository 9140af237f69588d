"""The training step's profile (`train.profile`, `unitune train --profile`): where a step's time
and memory go, measured on the run itself.

Each step's phases (`core/phases.py`: collation, the forward pass, the chunked LM head, its
recompute and backward, the rest of backward, clipping, the optimizer step, logging; an online
step's generation, scoring and reference passes) are written to its `metrics.jsonl` train line
as `phase/<name>_s`; the run's mean over its steps after the first (the first warms up) goes to
summary.json as `profile`, with the work each step did (tokens through the decoder, rows through
the head) and the memory it held: weights, gradients, optimizer state, the activations saved for
backward (measured: the bytes of every tensor autograd kept, parameters excluded), the head's
transient logits, and the process's resident memory before the model was loaded (the runtime).
Their sum is the memory floor a benchmark compares the peak RSS with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from unitune.core.allocator import in_use
from unitune.core.phases import PHASES

# phases in the order a step runs them (others, if any, after these)
ORDER = (
    "collate", "generate", "score", "reference", "probe", "forward", "head", "backward",
    "head_recompute", "head_backward", "clip", "optimizer", "log", "other",
)  # fmt: skip


class StepProfile:
    """Collects each step's phases (`take`) and summarizes the run (`summary`)."""

    def __init__(self, device: torch.device, runtime_bytes: int, module: nn.Module):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.runtime_bytes = runtime_bytes
        self.steps: list[dict] = []
        # the parameters' storages: not activations, whatever autograd saves of them
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen: dict[int, int] = {}

    def start(self) -> None:
        """Start recording (the caller disables `PHASES` when the steps end, however they end)."""
        PHASES.enable(self._sync)

    @contextmanager
    def activations(self) -> Iterator[None]:
        """Count the bytes autograd saves for backward while inside (each storage once)."""
        seen = self._seen

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._params:
                seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def begin(self) -> None:
        """A step starts: whatever was recorded since the last step (an evaluation's passes)
        is dropped."""
        PHASES.take()
        self._seen = {}

    def take(self, step_s: float) -> dict[str, float]:
        """This step's phases, as the metrics line's `phase/<name>_s` fields; `other`: the rest of
        the step's `step_s` (the loop's own bookkeeping between phases)."""
        PHASES.peak("activation_bytes", float(sum(self._seen.values())))
        self._seen = {}
        got = PHASES.take()
        got["seconds"]["other"] = max(step_s - sum(got["seconds"].values()), 0.0)
        self.steps.append(got)
        return {f"phase/{k}_s": round(v, 4) for k, v in got["seconds"].items()}

    def summary(self, module: nn.Module, optimizer: torch.optim.Optimizer, chunk: int) -> dict:
        """The mean step after the first (every step if there is one), and the memory floor."""
        steps = self.steps[1:] or self.steps
        n = max(len(steps), 1)
        names = {k for s in steps for k in s["seconds"]}
        known = [k for k in ORDER if k in names] + sorted(names - set(ORDER))
        seconds = {k: sum(s["seconds"].get(k, 0.0) for s in steps) / n for k in known}
        counts = {k: sum(s["counts"].get(k, 0.0) for s in steps) / n
                  for k in sorted({k for s in steps for k in s["counts"]})}  # fmt: skip
        params = list(module.parameters())
        trainable = [p for p in params if p.requires_grad]
        vocab = _vocab(module)
        memory = {
            "runtime": self.runtime_bytes,
            "weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer": sum(
                t.numel() * t.element_size()
                for st in optimizer.state.values()
                for t in st.values()
                if torch.is_tensor(t)
            ),  # fmt: skip
            "activations": max((s["peaks"].get("activation_bytes", 0.0) for s in steps), default=0),
            # one chunk's float32 logits and their softmax inside logsumexp, at the head
            "head_transient": 2 * 4 * vocab * min(chunk, int(counts.get("head_rows", 0)) or chunk),
        }
        memory["floor"] = sum(memory.values())
        return {
            "steps": len(steps),
            "step_s": sum(seconds.values()),
            "seconds": seconds,
            "counts": counts,
            "memory_bytes": {k: int(v) for k, v in memory.items()},
            "allocator": in_use(),  # what the peak RSS above the floor depends on
        }


def _vocab(module: nn.Module) -> int:
    model = getattr(module, "model", module)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(getattr(head, "out_features", 0) or 0)


def show(console: Console, profile: dict) -> None:
    """The profile as a table of at most 80 columns: seconds per step, share, memory."""
    t = Table(title=f"profile: mean step of {profile['steps']} (after the first)", width=60)
    t.add_column("phase")
    t.add_column("s/step", justify="right")
    t.add_column("share", justify="right")
    total = max(profile["step_s"], 1e-9)
    for name, s in profile["seconds"].items():
        t.add_row(name, f"{s:.3f}", f"{s / total:.0%}")
    t.add_row("step", f"{profile['step_s']:.3f}", "100%")
    console.print(t)
    on = f", on {profile['allocator']}" if profile.get("allocator") else ""
    m = Table(title=f"memory floor (GB){on}", width=60)
    m.add_column("part")
    m.add_column("GB", justify="right")
    for name, b in profile["memory_bytes"].items():
        m.add_row(name, f"{b / 1e9:.2f}")
    console.print(m)
