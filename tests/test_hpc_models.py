"""The benchmark's models: KV-cache decode, decode cost plans, parameter counts, test-time training."""
import pytest
import torch

from bench.harness.models import DECODE_PLAN_EXCLUDES, TransformerLM, model_dims, use_energy_aware_router
from bench.harness.ttt_model import TTTLanguageModel, ttt_parameters
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import OPS
from router.energy_router import EnergyAwareTTTRouter
from tests.conftest import DEVICE, rel_error

DIMS = model_dims(64, 24)  # 1 head of 64, d_ff 256


def decode_logits(lm, tokens, prompt_length):
    """Logits for positions prompt_length-1 .. end: a prefill, then one decode step per position."""
    cache = lm.new_cache(tokens.shape[0])
    out = [lm(tokens[:, :prompt_length], cache)[:, -1]]
    for i in range(prompt_length, tokens.shape[1]):
        out.append(lm(tokens[:, i:i + 1], cache)[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_decode_matches_the_full_forward(moe):
    lm = TransformerLM(DIMS, 2, moe=moe, use_kernels=False, device=DEVICE)
    tokens = torch.randint(0, 256, (3, 11), device=DEVICE)
    assert rel_error(decode_logits(lm, tokens, 7), lm(tokens)[:, 6:]) <= 1e-5


def test_decode_on_the_kernels_matches_the_reference():
    """One query against the cache (S_q = 1, causal=False) through our attention kernel."""
    tokens = torch.randint(0, 256, (2, 7), device=DEVICE)
    ours = decode_logits(TransformerLM(DIMS, 1, device=DEVICE), tokens, 5)
    reference = decode_logits(TransformerLM(DIMS, 1, use_kernels=False, device=DEVICE), tokens, 5)
    assert rel_error(ours, reference) <= 1e-5


def test_cache_misuse_is_refused():
    lm = TransformerLM(DIMS, 1, use_kernels=False)
    cache = lm.new_cache(2, capacity=6)
    lm(torch.randint(0, 256, (2, 5)), cache)
    with pytest.raises(ValueError, match="one position per sequence"):
        lm(torch.randint(0, 256, (2, 2)), cache)  # a chunk after cached keys would be mis-masked
    with pytest.raises(ValueError, match="batch"):
        lm(torch.randint(0, 256, (3, 1)), cache)
    lm(torch.randint(0, 256, (2, 1)), cache)
    with pytest.raises(ValueError, match="overflow"):
        lm(torch.randint(0, 256, (2, 1)), cache)
    cache.rewind(5)  # rewinding re-decodes the last slot, as the benchmark's steps do
    assert lm(torch.randint(0, 256, (2, 1)), cache).shape == (2, 1, 256)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_decode_cost_plan_is_table_ops_without_attention(moe):
    lm = TransformerLM(DIMS, 3, moe=moe, use_kernels=False)
    plan = lm.decode_cost_plan(batch_size=5)
    assert all(op in OPS for op, _, _ in plan) and all(tokens == 5 for _, tokens, _ in plan)
    assert not {"flash_attention", "attention_qk", "attention_av"} & {op for op, _, _ in plan}
    assert any("attention" in why for why in DECODE_PLAN_EXCLUDES)
    forward_ops = [(op, calls) for op, _, calls in lm.cost_plan(5) if op != "flash_attention"]
    assert forward_ops == [(op, calls) for op, _, calls in plan]  # the same ops, one token per sequence


def test_parameter_counts():
    dense = TransformerLM(DIMS, 2, use_kernels=False).parameter_counts()
    assert dense["active_per_token"] == dense["total"]
    moe = TransformerLM(DIMS, 2, moe=True, use_kernels=False).parameter_counts()
    per_expert = 3 * DIMS.d_model * DIMS.d_ff
    assert moe["total"] - moe["active_per_token"] == 2 * (DIMS.num_experts - DIMS.top_k) * per_expert


def test_model_dims():
    assert (model_dims(256, 512).n_heads, model_dims(256, 512).d_ff) == (4, 1024)  # the calibrated table's dims
    assert model_dims(96, 8).head_dim == 32
    with pytest.raises(ValueError, match="d_model"):
        model_dims(48, 8)


def ttt_model(frequency=16, chunk=12, muon=False, seed=0):
    lm = TransformerLM(DIMS, 2, use_kernels=False, seed=seed)
    return TTTLanguageModel(lm, ttt_update_frequency=frequency, ttt_chunk_size=chunk, energy_aware_lr=1e-2,
                            muon_enabled=muon)


@pytest.mark.parametrize("muon", [False, True], ids=["adam", "muon"])
def test_ttt_updates_count_and_touch_only_their_parameters(muon):
    model = ttt_model(muon=muon)
    frozen = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    with torch.no_grad():
        for _ in range(4):  # 2 x 8 = 16 tokens each: every call after the first updates first
            model(torch.randint(0, 256, (2, 8)))
    assert model.stats()["ttt_updates"] == 3 and model.stats()["ttt_time_s"] > 0
    changed = {n for n, p in model.lm.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed == set(ttt_parameters(model.lm))


def test_ttt_updates_every_frequency_tokens():
    model = ttt_model(frequency=20)
    with torch.no_grad():
        for _ in range(6):  # 8 tokens each: an update once 20 have passed, i.e. before calls 4 and 7
            model(torch.randint(0, 256, (1, 8)))
    assert model.stats()["ttt_updates"] == 1


def test_ttt_is_causal():
    """An update sees only earlier calls: a later call's tokens change neither the weights its own
    forward runs with nor any earlier position's logits."""
    first = torch.randint(0, 256, (2, 8))
    second = torch.randint(0, 256, (2, 8))
    altered = second.clone()
    altered[:, -1] = (second[:, -1] + 1) % 256
    a, b = ttt_model(), ttt_model()
    with torch.no_grad():
        a(first)
        b(first)
        logits_a, logits_b = a(second), b(altered)
    assert a.stats()["ttt_updates"] == b.stats()["ttt_updates"] == 1
    assert all(torch.equal(p, q) for p, q in zip(a.lm.parameters(), b.lm.parameters()))
    assert torch.equal(logits_a[:, :-1], logits_b[:, :-1])


def test_ttt_frozen_and_bad_arguments():
    model = ttt_model()
    model.adapt = False
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (2, 8)))
    assert model.stats()["ttt_updates"] == 0
    with pytest.raises(ValueError, match="dense"):
        TTTLanguageModel(TransformerLM(DIMS, 1, moe=True, use_kernels=False))
    with pytest.raises(ValueError, match="ttt_update_frequency"):
        TTTLanguageModel(TransformerLM(DIMS, 1, use_kernels=False), ttt_update_frequency=0)
    with pytest.raises(ValueError, match="energy_aware_lr"):
        TTTLanguageModel(TransformerLM(DIMS, 1, use_kernels=False), energy_aware_lr=-1.0)


def test_energy_aware_router_shares_the_gate():
    from bench.harness.costs import prior_cost_model
    cost_model, _ = prior_cost_model("H100", DIMS)
    assert isinstance(cost_model, KernelCostModel) and cost_model.is_prior
    lm = TransformerLM(DIMS, 2, moe=True, use_kernels=False, device=DEVICE)
    gates = [b.moe.gate.weight for b in lm.blocks]
    use_energy_aware_router(lm, cost_model, ttt_gate=True)
    assert all(isinstance(b.moe.gate, EnergyAwareTTTRouter) and b.moe.gate.weight is w
               for b, w in zip(lm.blocks, gates))
    assert lm(torch.randint(0, 256, (2, 8), device=DEVICE)).shape == (2, 8, 256)
    with pytest.raises(ValueError, match="MoE"):
        use_energy_aware_router(TransformerLM(DIMS, 1, use_kernels=False), cost_model)
