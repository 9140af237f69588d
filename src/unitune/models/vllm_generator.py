"""vLLM as the rollout generator on a GPU (`online.generator: vllm`, the `[vllm]` extra).

Colocated, as TRL's `vllm_mode: colocate`: each training process holds its own vLLM engine
(`vllm.LLM`, in-process: `distributed_executor_backend="external_launcher"`, tensor parallel
size 1) on its own GPU beside the policy, taking `gpu_memory_utilization` of the GPU's memory,
and generates its own share of the prompts. The engine loads the starting checkpoint once;
from then on its weights are the policy's: `sync(weights)` pushes every weight
(`lora.merged_weights`: LoRA merged out of place, the checkpoint's names, which vLLM's
`load_weights` maps onto its fused layers) through the model runner's `load_weights`, then
resets the prefix cache (KV blocks computed with the old weights must not be reused). The
online trainer syncs before every generation batch and every held-out evaluation, so the engine
never generates with weights older than the last optimizer step. With `sleep`, the engine
frees its weights and KV cache (vLLM's sleep level 2) after each generation batch (`release`)
and the weights are pushed again, after `wake_up`, before the next: a woken engine that was not
synced is the stale generator TRL shipped (#5312); here `generate` refuses to run on weights not
pushed since the engine woke.

The sampler's log-probs of the drawn tokens come back with the tokens (`logprobs=0`,
`logprobs_mode="processed_logprobs"`: after the temperature, as unitune's own sampler reports
them), so the online trainer's `sampling/sampling_logp_difference` compares them with the
training pass and warns past `online.max_logp_difference`. Each row carries its own seed
(vLLM's per-request `seed`), a function of the run's seed and the row, so a resumed run asks
for the same draws; vLLM's kernels are not batch-invariant, so a draw near a probability
boundary can still differ between an uninterrupted and a resumed run (greedy answers do not).

`check_vllm()` is the start-up check (the package, a CUDA GPU) that the online trainer's
engine check calls before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor


def check_vllm() -> str | None:
    """Why vLLM cannot generate here (one line), or None."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "online.generator: vllm needs the vllm package, which is not installed: "
            "pip install 'unitune[vllm]' (on a machine with a CUDA GPU)"
        )
    if not torch.cuda.is_available():
        return (
            "online.generator: vllm runs on a CUDA GPU and this machine has none; on a CPU use "
            "online.generator: unitune (the default)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmGenerator:
    """One process's colocated vLLM engine (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        *,
        dtype: torch.dtype,
        seed: int,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        sleep: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        from vllm import LLM

        # the external launcher reads the process group's coordinates from the environment
        # (a single process has none: it gets its own rendezvous port)
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.llm = LLM(
            model=str(path),
            dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=sleep,
            enable_prefix_caching=True,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            seed=seed,
            # vLLM v1's memory profiler reads the default (much larger) batch as too little memory
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            trust_remote_code=trust_remote_code,
        )
        # where the engine's weights live (vLLM runs on CUDA; the tests' CPU stand-in on the CPU)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available() else torch.device("cpu")
        )  # fmt: skip
        self.sleep_mode = sleep
        self.synced = False  # the engine holds weights pushed by `sync` and is awake
        if sleep:
            self.llm.sleep(level=2)

    def _model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def sync(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Push the policy's weights (checkpoint names, LoRA merged) into the engine, one tensor
        at a time, and reset its prefix cache; returns the number of tensors pushed."""
        if self.sleep_mode and not self.synced:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        model, n = self._model(), 0
        for name, w in weights:
            model.load_weights([(name, w.to(self.device))])
            n += 1
        self.llm.reset_prefix_cache()
        if self.sleep_mode and not self.synced:
            self.llm.wake_up(tags=["kv_cache"])
        self.synced = True
        return n

    def release(self) -> None:
        """With `sleep`: the engine's weights and KV cache freed until the next `sync` (the
        policy trains meanwhile); otherwise nothing."""
        if self.sleep_mode and self.synced:
            self.llm.sleep(level=2)
            self.synced = False

    def generate(
        self,
        prompts: list[list[int]],
        *,
        seeds: list[int],
        max_new_tokens: int,
        eos: list[int],
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Each prompt's new tokens (up to and including the first of `eos`, at most
        `max_new_tokens`) and the sampler's log-probs of them; greedy without `do_sample`."""
        from vllm import SamplingParams

        if not self.synced:
            raise RuntimeError("the vLLM engine was not given the policy's weights: sync() first")
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_p=top_p if do_sample else 1.0,
                top_k=top_k if do_sample else 0,
                stop_token_ids=list(eos),
                logprobs=0,
                seed=seed,
                detokenize=False,
            )  # fmt: skip
            for seed in seeds
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params, use_tqdm=False
        )
        return completions(outs)


def completions(outputs: list) -> tuple[list[list[int]], list[list[float]]]:
    """(tokens, log-probs) of each request's one completion from vLLM's `RequestOutput`s:
    `outputs[i].outputs[0].token_ids` (the stop or EOS token included: vLLM appends it before
    it stops) and, per token, its `Logprob` in `.logprobs[t][token]`."""
    tokens, logps = [], []
    for out in outputs:
        c = out.outputs[0]
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no log-prob for some generated token")
        tokens.append(ids)
        logps.append([float(lp[t].logprob) for lp, t in zip(c.logprobs, ids, strict=True)])
    return tokens, logps
