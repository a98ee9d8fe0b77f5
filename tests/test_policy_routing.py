"""Baseline-preserving re-routing (``kernels.policy_routing``) and its two routers against torch."""
import json

import pytest
import torch

import kernels
from calibration.priors import prior_table
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from kernels.cost_bias import cost_curves
from kernels.policy_routing import FillCost, policy_routing, policy_routing_reference
from router import EnergyAwareTTTRouter, OEARouter
from tests.conftest import DEVICE, DTYPES, ON_GPU, randn, requires_gpu

H, I = 64, 128
SHAPES = [  # (T, E, K)
    pytest.param(1, 12, 4, id="T1"),
    pytest.param(37, 12, 3, id="odd-T"),
    pytest.param(70, 64, 8, id="E64-K8-two-blocks"),
    pytest.param(5, 7, 7, id="K=E-odd-E"),
    pytest.param(0, 8, 2, id="empty"),
    pytest.param(300, 16, 4, id="grid-two-launches"),
]
KEEPS = [pytest.param({"keep_top_k": 1}, id="k1"), pytest.param({"keep_top_k": 2}, id="k2"),
         pytest.param({"keep_share": 0.6}, id="p0.6"), pytest.param({"keep_share": 1.0}, id="p1")]
HOT_STATE = (70.0, 400.0, 0.5)


def curves_for(num_experts, tmp_path):
    dims = ModelDims(d_model=H, d_ff=I, n_heads=1, num_experts=num_experts, top_k=2)
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(prior_table("H100", dims)))
    return KernelCostModel("H100", table=path)


def fill_cost(model, num_experts, max_shift=0.4, offsets=None):
    offsets = torch.zeros(num_experts, device=DEVICE) if offsets is None else offsets
    return FillCost(cost_curves(model.device_curves("swiglu_ffn"), DEVICE), torch.tensor(HOT_STATE, device=DEVICE), offsets,
                    {"energy_weight": 1.0, "max_shift": max_shift})


def assert_same(result, logits, top_k, num_experts, **routing):
    """The kernel's fill bias against torch's (exp/log differ in the last ulp, and a busy expert's
    marginal cost is a difference of two such values), then its selection exactly, with that bias."""
    _, _, _, fill_bias = policy_routing_reference(logits, top_k, **routing)
    assert torch.allclose(result.fill_bias, fill_bias, rtol=1e-5, atol=1e-6), "fill bias"
    weights, ids, kept, _ = policy_routing_reference(logits, top_k, fill_bias=result.fill_bias, **routing)
    assert torch.equal(result.topk_ids.long(), ids)
    assert torch.allclose(result.topk_weights, weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(result.kept.long(), kept)
    valid = result.topk_ids >= 0
    assert ((result.topk_ids < num_experts) | ~valid).all()
    for row in result.topk_ids.tolist():  # distinct experts per token (empty slots aside)
        chosen = [i for i in row if i >= 0]
        assert len(chosen) == len(set(chosen))


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("fill", ["active", "cost"])
@pytest.mark.parametrize("T, E, K", SHAPES)
def test_policy_routing_matches_torch(T, E, K, fill, keep, tmp_path):
    logits = randn(T, E, scale=2.0)
    if keep.get("keep_top_k", 1) > K:
        pytest.skip("keeps more than K")
    cost = fill_cost(curves_for(E, tmp_path), E) if fill == "cost" else None
    result = policy_routing(logits, K, fill=fill, cost=cost, **keep)
    assert_same(result, logits, K, E, fill=fill, cost=cost, **keep)
    kernel_plain = kernels.route(logits, K).topk_ids if T else result.plain_ids
    assert torch.equal(result.plain_ids, kernel_plain), "plain ids are plain top-k"


@pytest.mark.parametrize("T", [9, 300])  # one fused launch, and the two-launch grid
def test_logits_are_read_with_their_row_stride(T, tmp_path):
    """Column slices of wider logits (a row stride that is no multiple of 16, a compile-time constant
    of the kernel) give what their contiguous copy gives."""
    E, K = 60, 4
    logits = randn(T, 64, scale=2.0)[:, :E]
    cost = fill_cost(curves_for(E, tmp_path), E)
    result = policy_routing(logits, K, fill="cost", cost=cost, keep_top_k=1)
    assert_same(result, logits.contiguous(), K, E, fill="cost", cost=cost, keep_top_k=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_nan_tokens_and_masked_experts(dtype, tmp_path):
    T, E, K = 9, 12, 4
    logits = randn(T, E, dtype=dtype, scale=2.0)
    logits[2] = float("nan")
    logits[4, :3] = float("inf")  # overflow counts as NaN
    user_bias = torch.zeros(E, device=DEVICE)
    user_bias[5] = -float("inf")  # a caller's mask
    for fill, cost in (("active", None), ("cost", fill_cost(curves_for(E, tmp_path), E))):
        result = policy_routing(logits, K, fill=fill, keep_top_k=2, selection_bias=user_bias, cost=cost)
        assert_same(result, logits, K, E, fill=fill, keep_top_k=2, selection_bias=user_bias, cost=cost)
        assert int(result.nan_tokens) == 2, "the NaN row and the +Inf row (overflow counts as NaN)"
        assert (result.topk_ids[2] == -1).all() and (result.topk_weights[2] == 0).all(), "a NaN token runs nothing"
        assert not (result.topk_ids == 5).any(), "a masked expert is never chosen"


def test_oea_fills_only_from_the_active_set_and_leaves_a_lone_token_with_k0():
    E, K = 16, 4
    logits = randn(6, E, scale=3.0)
    result = policy_routing(logits, K, fill="active", keep_top_k=1)
    kept = set(result.plain_ids[:, 0].tolist())
    assert set(result.topk_ids[result.topk_ids >= 0].tolist()) <= kept, "the batch touches only the kept experts"
    lone = policy_routing(logits[:1], K, fill="active", keep_top_k=1)
    assert lone.topk_ids[0, 1:].tolist() == [-1] * (K - 1) and lone.topk_weights[0, 0] == 1.0


def test_cost_fill_prefers_woken_experts_within_the_shift(tmp_path):
    """An idle expert is taken over a woken one only when its probability leads by more than the
    idle bias; max_shift 0 is plain top-k, and a huge one never wakes an expert for a fill (16
    tokens keep more than the 3 experts a fill needs)."""
    E, K = 16, 4
    model = curves_for(E, tmp_path)
    logits = randn(16, E, scale=1.0)
    plain = kernels.route(logits, K)
    exact = policy_routing(logits, K, fill="cost", keep_top_k=1, cost=fill_cost(model, E, max_shift=0.0))
    assert torch.equal(exact.topk_ids, plain.topk_ids) and torch.allclose(exact.topk_weights, plain.topk_weights)
    greedy = policy_routing(logits, K, fill="cost", keep_top_k=1, cost=fill_cost(model, E, max_shift=1e3))
    woken = set(plain.topk_ids[:, 0].tolist())
    assert set(greedy.topk_ids.unique().tolist()) - {-1} <= woken, "with a huge shift no fill wakes an idle expert"
    bounded = policy_routing(logits, K, fill="cost", keep_top_k=1, cost=fill_cost(model, E, max_shift=0.4))
    assert torch.unique(bounded.topk_ids).numel() <= torch.unique(plain.topk_ids).numel()
    assert (bounded.fill_bias >= -0.4).all() and (bounded.fill_bias <= 0).all()


def test_a_fill_takes_an_expert_only_above_its_price(tmp_path):
    """An idle expert fills a slot only where probability + fill bias > 0: a lone token (every
    unkept expert idle, priced near max_shift) runs its kept experts alone; a confident one fills
    with its second expert once its probability beats the idle price; in a batch every woken idle
    expert was worth its price, and no slot stays empty while an expert some token keeps is left."""
    E, K = 16, 4
    cost = fill_cost(curves_for(E, tmp_path), E, max_shift=0.4)
    flat = randn(1, E, scale=0.1)  # no unkept expert near 0.4
    lone = policy_routing(flat, K, fill="cost", keep_top_k=1, cost=cost)
    assert lone.topk_ids[0, 1:].tolist() == [-1] * (K - 1) and lone.topk_weights[0, 0] == 1.0
    two = torch.full((1, E), -30.0, device=DEVICE)
    two[0, 3], two[0, 7] = 0.0, 0.0  # two experts of probability 1/2 each: the second beats its price
    paired = policy_routing(two, K, fill="cost", keep_top_k=1, cost=cost)
    assert paired.topk_ids[0, :2].tolist() == [3, 7] and paired.topk_ids[0, 2:].tolist() == [-1] * (K - 2)
    assert -paired.fill_bias[7] < 0.5, "the idle price is below the probability it was paid for"
    logits = randn(24, E, scale=2.0)
    batch = policy_routing(logits, K, fill="cost", keep_top_k=1, cost=cost)
    probs = torch.softmax(logits.float(), -1)
    slot = torch.arange(K, device=DEVICE)[None, :]
    woken = torch.zeros(E, dtype=torch.bool, device=DEVICE)
    woken[batch.plain_ids[slot < batch.kept[:, None]].long()] = True
    ids = batch.topk_ids.clamp_min(0).long()
    idle_fill = (batch.topk_ids >= 0) & (slot >= batch.kept[:, None]) & ~woken[ids]
    assert idle_fill.any(), "some token woke an idle expert (the test must exercise the price)"
    assert (probs.gather(1, ids) > -batch.fill_bias[ids])[idle_fill].all(), "every woken idle expert paid"
    for t in range(24):  # an empty slot means the token's woken candidates ran out
        if (batch.topk_ids[t] == -1).any():
            assert set(torch.nonzero(woken).flatten().tolist()) <= set(batch.topk_ids[t].tolist()), t
    assert_same(batch, logits, K, E, fill="cost", keep_top_k=1, cost=cost)


def test_keep_share_keeps_until_the_share(tmp_path):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device=DEVICE))
    for share, kept in ((0.4, 1), (0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (1.0, 4)):
        assert policy_routing(logits, 4, fill="active", keep_share=share).kept.item() == kept, share


@pytest.mark.parametrize("bad, match", [
    ({"keep_top_k": 0}, "keep_top_k"), ({"keep_top_k": 5}, "keep_top_k"), ({"keep_share": 0.0}, "keep_share"),
    ({"keep_share": 1.5}, "keep_share"), ({"keep_top_k": 1, "keep_share": 0.5}, "exactly one"), ({}, "exactly one"),
    ({"keep_top_k": 1, "fill": "nearest"}, "fill"), ({"keep_top_k": 1, "fill": "cost"}, "FillCost"),
    ({"keep_top_k": True}, "keep_top_k"), ({"keep_top_k": 1, "renormalize": 1}, "renormalize"),
])
def test_bad_arguments_are_refused_by_name(bad, match):
    args = {"fill": "active"} | bad
    with pytest.raises((ValueError, TypeError), match=match):
        policy_routing(randn(4, 8), 4, **args)


def test_bad_tensors_are_refused_by_name(tmp_path):
    with pytest.raises((ValueError, TypeError), match="router_logits"):
        policy_routing(randn(4, 8).T, 4, fill="active", keep_top_k=1)
    with pytest.raises((ValueError, TypeError), match="router_logits"):
        policy_routing(torch.zeros(4, 8, dtype=torch.int32, device=DEVICE), 4, fill="active", keep_top_k=1)
    with pytest.raises(ValueError, match="selection_bias"):
        policy_routing(randn(4, 8), 4, fill="active", keep_top_k=1, selection_bias=torch.zeros(7, device=DEVICE))
    cost = fill_cost(curves_for(8, tmp_path), 9)
    with pytest.raises(ValueError, match="bias_offsets"):
        policy_routing(randn(4, 8), 4, fill="cost", keep_top_k=1, cost=cost)
    with pytest.raises(TypeError, match="FillCost"):
        policy_routing(randn(4, 8), 4, fill="cost", keep_top_k=1, cost={"energy_weight": 1.0})


# ---- the routers ---------------------------------------------------------------------------------

def routers(tmp_path, E=16, K=4, **kwargs):
    plain = kernels.TopKRouter(randn(E, H, scale=H ** -0.5), K)
    ours = EnergyAwareTTTRouter.from_router(plain, curves_for(E, tmp_path), objective_weights={"quality": 1.0},
                                            adapt=False, **kwargs)
    return plain, ours


def test_energy_router_policy_is_the_kernel_and_reports_stats(tmp_path):
    plain, ours = routers(tmp_path, keep_top_k=2)
    x = randn(16, H)
    logits, weights, ids = ours(x)
    cost = FillCost(ours._curves, ours._state(), ours.bias_offsets, ours._bias_knobs())
    kernel = policy_routing(logits, 4, fill="cost", keep_top_k=2, cost=cost)
    assert torch.equal(ids, kernel.topk_ids) and torch.allclose(weights, kernel.topk_weights, rtol=1e-6, atol=1e-7)
    assert_same(kernel, logits, 4, 16, fill="cost", keep_top_k=2, cost=cost)
    stats = ours.stats()
    assert stats["keep_top_k"] == 2 and stats["calls"] == 1
    assert stats["distinct_experts_per_call"] <= stats["plain_distinct_experts_per_call"]


def test_energy_router_policy_without_cost_weights_is_plain_topk(tmp_path):
    plain = kernels.TopKRouter(randn(16, H, scale=H ** -0.5), 4)
    ours = EnergyAwareTTTRouter.from_router(plain, curves_for(16, tmp_path), objective_weights={"energy": 0.0},
                                            keep_share=0.5, adapt=False)
    x = randn(9, H)
    assert torch.equal(ours(x)[2], plain(x)[2])


def test_oea_router_matches_the_kernel_and_keeps_weights_differentiable():
    plain = kernels.TopKRouter(randn(16, H, scale=H ** -0.5), 4)
    oea = OEARouter.from_router(plain, 2)
    x = randn(8, H)
    logits, weights, ids = oea(x)
    ref_weights, ref_ids, _, _ = policy_routing_reference(logits, 4, fill="active", keep_top_k=2)
    assert torch.equal(ids.long(), ref_ids) and torch.allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
    assert oea.stats()["calls"] == 1
    lone = OEARouter(plain.weight.detach().clone(), 4, 1)
    _, grad_weights, grad_ids = lone(x[:1])  # one token: three empty slots
    assert (grad_ids[0, 1:] == -1).all() and (grad_weights[0, 1:] == 0).all()
    (grad_weights * randn(*grad_weights.shape)).sum().backward()
    assert lone.weight.grad is not None and torch.isfinite(lone.weight.grad).all()


def test_oea_router_keeping_k_is_plain_topk():
    plain = kernels.TopKRouter(randn(16, H, scale=H ** -0.5), 4)
    x = randn(11, H)
    assert torch.equal(OEARouter.from_router(plain, 4)(x)[2], plain(x)[2])


def test_fused_moe_skips_empty_slots():
    E, K = 8, 4
    plain = kernels.TopKRouter(randn(E, H, scale=H ** -0.5), K)
    layer = kernels.FusedMoE(OEARouter.from_router(plain, 1), randn(E, 2 * I, H, scale=H ** -0.5),
                             randn(E, H, I, scale=I ** -0.5))
    x = randn(1, H)
    _, weights, ids = layer.gate(x)
    assert (ids[0, 1:] == -1).all()
    expected = kernels.fused_experts(x, layer.experts.gate_up_proj, layer.experts.down_proj, ids[:, :1],
                                     weights[:, :1])
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [({"keep_top_k": 0}, "keep_top_k"), ({"keep_top_k": 9}, "keep_top_k"),
                                        ({"keep_share": 0}, "keep_share"),
                                        ({"keep_top_k": 2, "keep_share": 0.5}, "at most one")])
def test_energy_router_refuses_bad_keeps(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        routers(tmp_path, **bad)


def test_oea_router_refuses_bad_keeps():
    plain = kernels.TopKRouter(randn(8, H), 4)
    for bad in (0, 5, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="keep_top_k"):
            OEARouter.from_router(plain, bad)


@requires_gpu
@pytest.mark.parametrize("kind", ["oea", "ours"])
def test_routers_capture_in_a_graph_without_host_syncs(kind, tmp_path):
    plain, ours = routers(tmp_path, E=64, K=8, keep_share=0.5)
    router = OEARouter.from_router(plain, 2) if kind == "oea" else ours
    x = randn(16, H, dtype=torch.bfloat16)
    router.to(torch.bfloat16)
    eager = router(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        router(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        router(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = router(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[2], eager[2]) and torch.equal(captured[1], eager[1])


@pytest.mark.skipif(not ON_GPU, reason="bf16 logits on the GPU only")
def test_bf16_logits_match_torch(tmp_path):
    logits = randn(33, 64, dtype=torch.bfloat16, scale=2.0)
    cost = fill_cost(curves_for(64, tmp_path), 64)
    result = policy_routing(logits, 8, fill="cost", keep_share=0.5, cost=cost)
    assert_same(result, logits, 8, 64, fill="cost", keep_share=0.5, cost=cost)
