import torch

from unitune.data import Sequence
from unitune.models.config import ModelConfig
from unitune.models.fingerprint import model_fingerprint
from unitune.models.load import load_model
from unitune.training.policy import PolicyLogps
from unitune.training.references import reference_logps


def seqs(offset=0):
    return [
        Sequence(tuple(range(10 + offset, 10 + offset + n)), (0,) * 3 + (1,) * (n - 3))
        for n in (5, 9, 7)
    ]


def run(policy, items, tmp_path, fp=None, **kw):
    return reference_logps(
        policy,
        items,
        model_fp=fp or model_fingerprint(policy.model),
        cache_dir=tmp_path,
        pad_id=0,
        batch_size=2,
        device=torch.device("cpu"),
        **kw,
    )


def test_miss_then_hit_with_identical_values(tmp_path):
    model, _ = load_model(ModelConfig(name="builtin:tiny"))
    policy = PolicyLogps(model, chunk_size=4)
    first, hit1, key1 = run(policy, seqs(), tmp_path)
    second, hit2, key2 = run(policy, seqs(), tmp_path)
    assert (hit1, hit2) == (False, True) and key1 == key2
    assert (tmp_path / "refs" / f"{key1}.safetensors").exists()  # the entry a checkpoint names
    assert torch.equal(first, second)
    assert len(list((tmp_path / "refs").glob("*.safetensors"))) == 1
    # the values are the model's log-probs, in input order
    for i, s in enumerate(seqs()):
        ids = torch.tensor([s.input_ids])
        mask = torch.ones_like(ids)
        want, _ = policy(ids, mask, torch.tensor([s.target_mask]))
        torch.testing.assert_close(first[i : i + 1], want.detach(), atol=1e-5, rtol=0)


def test_other_data_or_model_misses(tmp_path):
    model, _ = load_model(ModelConfig(name="builtin:tiny"))
    policy = PolicyLogps(model, chunk_size=4)
    run(policy, seqs(), tmp_path)
    assert run(policy, seqs(offset=1), tmp_path)[1] is False  # other tokens
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    assert run(policy, seqs(), tmp_path)[1] is False  # other weights
    assert len(list((tmp_path / "refs").glob("*.safetensors"))) == 3


def test_only_cached_computes_nothing(tmp_path):
    model, _ = load_model(ModelConfig(name="builtin:tiny"))
    policy = PolicyLogps(model, chunk_size=4)
    logps, hit, key = run(policy, seqs(), tmp_path, only_cached=True)
    assert (logps, hit) == (None, False) and not (tmp_path / "refs").exists()
    run(policy, seqs(), tmp_path)
    logps, hit, _ = run(policy, seqs(), tmp_path, only_cached=True)
    assert hit and logps is not None


def test_no_temp_files_left_behind(tmp_path):
    model, _ = load_model(ModelConfig(name="builtin:tiny"))
    run(PolicyLogps(model, chunk_size=4), seqs(), tmp_path)
    assert [p.suffix for p in (tmp_path / "refs").iterdir()] == [".safetensors"]
