"""unitune's log-probs against each architecture's own forward on a GPU.

    PYTHONPATH=src:tests python scripts/cuda_architectures.py [--out results.json]

The CPU suite (tests/test_architectures.py) checks every architecture in tests/architectures.py
in fp32 with SDPA. This script runs the same small random models on CUDA, in fp32 and in bf16,
with SDPA and eager attention, padded and packed, and one model of real size (a Llama of about
1B parameters) in bf16: for each, the largest difference per sequence between unitune's summed
log-probs and `model(...).logits -> log_softmax -> gather`, divided by the sequence's target
tokens (the load-time probe refuses a mean gap above 1e-3 nats per token in fp32, 0.25 in bf16).
It needs only torch and transformers (no unitune dependencies beyond them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from architectures import ARCHITECTURES
from transformers import AutoConfig, AutoModelForCausalLM

from unitune.models.logprobs import naive_sequence_logps, sequence_logps

VOCAB = 1024
BIG = {  # about 1.1B parameters, Llama-shaped
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}


def batch(vocab: int, lengths: list[int], device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=g)
    am = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    tm = torch.ones_like(ids)
    tm[:, :3] = 0
    return ids.to(device), am.to(device), tm.to(device)


def build(model_type: str, overrides: dict, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    kwargs = {"pad_token_id": 0, **{k: v for k, v in overrides.items() if v is not None}}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.cuda().eval()


def gaps(model: torch.nn.Module, lengths: list[int]) -> dict[str, float]:
    ids, am, tm = batch(VOCAB, lengths, "cuda")
    with torch.no_grad():
        want, n = naive_sequence_logps(model, ids, am, tm)
        padded, _ = sequence_logps(model, ids, am, tm, chunk_size=7)
        packed, _ = sequence_logps(model, ids, am, tm, chunk_size=7, packed=True)
    per_token = n.clamp(min=1).float()
    return {
        "padded": ((padded - want).abs() / per_token).max().item(),
        "packed": ((packed - want).abs() / per_token).max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for model_type, overrides in ARCHITECTURES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for attn in ("sdpa", "eager"):
                row = {"model_type": model_type, "dtype": str(dtype)[6:], "attn": attn}
                try:
                    row.update(gaps(build(model_type, overrides, dtype, attn), [11, 5, 8]))
                except Exception as e:  # noqa: BLE001 - reported per row, the sweep goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    t = time.perf_counter()
    big = build("llama", BIG, torch.bfloat16, "sdpa")
    params = sum(p.numel() for p in big.parameters())
    row = {"model_type": "llama-1.1B", "dtype": "bfloat16", "attn": "sdpa", "params": params}
    row.update(gaps(big, [200, 120, 170, 64]))
    row["seconds"] = round(time.perf_counter() - t, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
