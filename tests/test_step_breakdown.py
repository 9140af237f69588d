"""benchmarks/step_levers.py --ops: the recorded step covers forward and backward, every call
replays, and the GEMM FLOPs counted from the recorded shapes are the model's own."""

import sys
from pathlib import Path

from conftest import padded_batch, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_levers import float_shapes, gemm_flops, record_step, replay_seconds  # noqa: E402


def test_gemm_flops_by_hand() -> None:
    assert gemm_flops("mm", [(5, 7), (7, 3)]) == 2 * 5 * 7 * 3
    assert gemm_flops("addmm", [(3,), (5, 7), (7, 3)]) == 2 * 5 * 7 * 3
    assert gemm_flops("bmm", [(4, 5, 7), (4, 7, 3)]) == 4 * 2 * 5 * 7 * 3


def test_record_and_replay_one_step() -> None:
    model = tiny_llama(vocab_size=50).train()
    b = padded_batch(50, rows=2, width=9, short_to=7, target_from=4)
    mask, target = b["attention_mask"], b["target_mask"]
    calls = record_step(model, b)
    names = [f.__name__.split(".")[0] for f, _, _ in calls]
    # forward and backward are both recorded: SDPA's backward, SiLU's backward
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert "silu_backward" in names
    # each of the 7 decoder linears per layer and the head: one GEMM forward, two backward
    # (the head's input gradient and weight gradient; the embedding has no GEMM), plus the
    # head's recompute in backward
    gemms = [(n, a) for n, (_, a, _) in zip(names, calls, strict=True) if n in ("mm", "addmm")]
    assert len(gemms) == 3 * 7 * 2 + 4
    layers = (
        2 * 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)
    )  # 2 layers of q, o; k, v; gate, up, down
    rows = 2 * 9
    flops = sum(gemm_flops(n, float_shapes(a)) for n, a in gemms)
    head_rows = int((mask[:, 1:] & target[:, 1:]).sum())
    assert flops == 3 * rows * layers + 4 * 2 * head_rows * 32 * 50
    seconds, failed = replay_seconds(calls, reps=1)
    assert failed == []
    assert len(seconds) == len(calls) and all(s == s and s >= 0 for s in seconds)
