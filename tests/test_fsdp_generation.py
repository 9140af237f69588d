"""Generation under FSDP (training/rollout.full_parameters): the policy sharded over 2 CPU
processes (gloo) with FSDP2 (`fully_shard`) and FSDP1 (`FullyShardedDataParallel`), per decoder
layer and at the root as Accelerate prepares unitune's `PolicyLogps`, samples the same tokens
with the same log-probs as the whole model on one process, with no all-gather while it
generates (all are done once on entry), and leaves the weights sharded and training as before.

Accelerate enables FSDP only with an accelerator (tests/test_engines.py), so a whole `unitune
train` under FSDP cannot run on CPU; torch's FSDP itself runs on CPU with gloo, which is what
these tests drive, the way `acc.prepare` wraps the policy."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import perturbed_tiny
from test_distributed import free_port

from unitune.training.engines import Engine
from unitune.training.online import rollout_forward
from unitune.training.policy import PolicyLogps
from unitune.training.rollout import full_parameters, sample

TEXTS = ["Describe a hen.", "Describe a gnu, the animal of the plains, in a few words.",
         "A ram?", "Tell me about the yak and the places it lives in."]  # fmt: skip
MAX_NEW = (6, 3)  # per process: a different number of forwards on each


def _rollouts(model, tok, rank: int, *, sampled: bool):
    """Process `rank`'s rollouts: its own two prompts (of different lengths: left padding) and
    its own max_new_tokens, as each process generates for its share of the prompts. Transformers
    does not sync the processes' generation loops for a model that is not itself FSDP-wrapped
    (`synced_gpus`), so any collective per token would leave them waiting on each other."""
    prompts = [tok(t)["input_ids"] for t in TEXTS[2 * rank : 2 * rank + 2]]
    eos, pad, new = [tok.eos_token_id], tok.pad_token_id, MAX_NEW[rank]
    if sampled:
        return sample(model, prompts, num_generations=2, eos=eos, pad_id=pad,
                      max_new_tokens=new, temperature=0.9, seed=3)  # fmt: skip
    return sample(model, prompts, num_generations=1, eos=eos, pad_id=pad,
                  max_new_tokens=new, do_sample=False)  # fmt: skip


def _per_token(module, r):
    """The training pass over rollouts `r` (the objective forward online.py runs)."""
    return module(r.input_ids, r.attention_mask, None, objective_forward=rollout_forward,
                  starts=r.starts, width=r.mask.shape[1], temperature=0.9)  # fmt: skip


def _fields(r) -> dict:
    return {"ids": r.input_ids, "mask": r.mask, "logp": r.sample_logp}


class _Gathers:
    """Counts the all-gathers FSDP1 and FSDP2 issue (`dist.all_gather` for FSDP1's CPU flat
    parameters, `dist.all_gather_single` otherwise)."""

    def __init__(self):
        self.n = 0
        for name in ("all_gather", "all_gather_single"):
            real = getattr(dist, name)

            def counted(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)

            setattr(dist, name, counted)


def _shard(policy: PolicyLogps, version: int):
    """The policy wrapped as Accelerate's FSDP prepare does: a unit per decoder layer and the
    root at the prepared module. (root, the causal LM inside, the modules whose params are
    sharded)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in policy.model.model.layers:
            fully_shard(layer)
        fully_shard(policy)
        return policy, policy.model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    root = FSDP(policy, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                use_orig_params=True, device_id=torch.device("cpu"))  # fmt: skip
    return root, root.module.model


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` (FSDP2's DTensors), `t` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_numel(module) -> int:
    """Parameter elements this process holds."""
    return sum(_local(p).numel() for p in module.parameters())


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    gathers = _Gathers()
    results = {}
    for version in (2, 1):
        model, tok = perturbed_tiny()
        full = sum(p.numel() for p in model.parameters())
        root, lm = _shard(PolicyLogps(model, chunk_size=64), version)
        engine = Engine("fsdp", 2, fsdp_version=version)
        res: dict = {"full": full, "no_root": None}
        try:  # the causal LM alone: its FSDP root is the prepared module around it
            with full_parameters(lm, engine):
                pass
        except RuntimeError as e:
            res["no_root"] = str(e)
        # the first rollout comes before any forward of the root (online training's order)
        before = gathers.n
        with full_parameters(lm, engine, wrapped=root):
            res["entry_gathers"] = gathers.n - before
            at = gathers.n
            greedy = _rollouts(lm, tok, rank, sampled=False)
            sampled = _rollouts(lm, tok, rank, sampled=True)
            res["generation_gathers"] = gathers.n - at
        res["greedy"], res["sampled"] = _fields(greedy), _fields(sampled)
        res["local_after"] = _local_numel(root)
        # a training pass through the root then works as it did, the layers resharded by their
        # forward as before (FSDP2: the setting given back), and the gradients flow
        logp = _per_token(root, sampled)
        if version == 2:
            res["layers_sharded_in_forward"] = all(
                hasattr(p, "to_local") for p in lm.model.layers.parameters()
            )
        logp.sum().backward()
        res["train_logp"] = logp.detach()
        grads = [p.grad for p in root.parameters() if p.grad is not None]
        res["grad_norm"] = sum(float(_local(g).norm()) for g in grads)
        # and a second rollout, after the backward, is the same again
        with full_parameters(lm, engine, wrapped=root):
            res["greedy_again"] = _fields(_rollouts(lm, tok, rank, sampled=False))
        results[version] = res
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Both processes' results (FSDP2 and FSDP1, one launch: the start-up paid once)."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def whole():
    """The same model on one process, unsharded: each process's rollouts."""
    model, tok = perturbed_tiny()
    policy = PolicyLogps(model, chunk_size=64)
    out = []
    for rank in range(2):
        greedy = _rollouts(model, tok, rank, sampled=False)
        sampled = _rollouts(model, tok, rank, sampled=True)
        out.append({"greedy": _fields(greedy), "sampled": _fields(sampled),
                    "train_logp": _per_token(policy, sampled).detach()})  # fmt: skip
    return out


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Token ids and masks exactly; log-probs to float32 rounding."""
    if want.is_floating_point():
        return torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    return torch.equal(got, want)


@pytest.mark.parametrize("version", [2, 1])
def test_sharded_generation_equals_the_whole_model(sharded, whole, version):
    """Greedy and seeded sampled rollouts under full_parameters on each of the 2 processes:
    the same tokens and masks as on one process, exactly (the gathered weights are the
    weights), and the same sampler log-probs to float32 rounding (the sharded and the whole
    model may order a reduction differently across threads); again after a training step."""
    for rank, one in enumerate(whole):
        res = sharded[rank][version]
        for kind in ("greedy", "sampled"):
            for key, want in one[kind].items():
                assert same(res[kind][key], want), (version, rank, kind, key)
        for key, want in one["greedy"].items():
            assert same(res["greedy_again"][key], want), (version, rank, "again", key)
        assert torch.allclose(res["train_logp"], one["train_logp"], atol=1e-6)
        # not trivial: tokens were generated, and the sampled ones are not the greedy ones
        assert one["greedy"]["mask"].sum(dim=1).tolist() == [MAX_NEW[rank]] * 2
        assert not torch.equal(one["sampled"]["ids"][::2], one["greedy"]["ids"])


@pytest.mark.parametrize("version", [2, 1])
def test_weights_gathered_once_and_sharded_again(sharded, version):
    """All-gathers happen on entering (one per FSDP unit: 2 layers + the root), none while
    tokens are generated; afterwards each process holds about half the weights again; the
    training pass still reshards the layers after their forward and gives gradients."""
    for res in (s[version] for s in sharded):
        assert "pass the prepared module" in res["no_root"]
        assert res["entry_gathers"] == 3
        assert res["generation_gathers"] == 0
        assert res["local_after"] <= res["full"] // 2 + 1024  # a shard (+ FSDP's padding)
        assert res["grad_norm"] > 0
        if version == 2:
            assert res["layers_sharded_in_forward"]


def test_a_module_without_fsdp_units_is_left_alone():
    """Under an FSDP engine, a model with no FSDP unit (the frozen reference, copied before
    `prepare`) needs nothing gathered: full_parameters is a no-op there; the engines that do not
    shard are no-ops too."""
    model, tok = perturbed_tiny()
    want = _fields(_rollouts(model, tok, 0, sampled=False))
    for engine in (Engine("fsdp", 2, fsdp_version=2), Engine("fsdp", 2, fsdp_version=1),
                   Engine("ddp", 2), Engine("single", 1),
                   Engine("deepspeed", 2, zero_stage=2)):  # fmt: skip
        with full_parameters(model, engine):
            got = _fields(_rollouts(model, tok, 0, sampled=False))
        assert all(torch.equal(got[k], want[k]) for k in want), engine
