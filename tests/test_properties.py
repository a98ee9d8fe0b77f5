"""Property-based checks of the public ops against their torch references (hypothesis).

Shapes go down to T=0, E=1, K=E, H=1 and I=1, with odd strides, and the inputs include -inf, NaN
and +Inf logits and biases. Hypothesis draws the shapes and a seed, and each example draws its
tensors from that seed, so a failure shrinks to a small shape and replays exactly. The runs are
derandomized (a fixed seed, no example database) and bounded per property so the suite stays
inside CI's time on two CPU cores.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels.attention import flash_attention_reference
from kernels.fused_experts import fused_experts_reference
from kernels.gather_sum import gather_sum, gather_sum_reference
from kernels.routing import UNSELECTABLE, route_reference
from kernels.swiglu import swiglu_ffn_reference
from router import EnergyAwareTTTRouter
from tests.conftest import DEVICE, REL_TOL, assert_matches, rel_error
from tests.test_router import cost_model as cost_model  # noqa: F401 (the fixture)
from tests.test_router import E as ROUTER_E, H as ROUTER_H, K as ROUTER_K

CPU_DTYPES = (torch.float32, torch.float16)  # bf16 is the GPU's (the interpreter refuses it)
# per property: a few seconds each under the interpreter; on a GPU every new shape compiles (~1 s)
EXAMPLES = 100 if DEVICE == "cpu" else 8

bounded = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
seeds = st.integers(0, 2 ** 31 - 1)
dtypes = st.sampled_from(CPU_DTYPES)


def tensor(gen, *shape, dtype=torch.float32, scale=1.0):
    """Random normal data from ``gen``, on the device under test."""
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def strided(gen, t, odd):
    """``t`` itself, or (``odd``) an equal view into a wider buffer whose rows are 3 elements longer."""
    if not odd or t.dim() == 0:
        return t
    wide = tensor(gen, *t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    view = wide[..., 1:1 + t.shape[-1]]
    view.copy_(t)
    return view


def specials(gen, t, share):
    """``t`` with about ``share`` of its entries replaced by -inf, NaN or +Inf."""
    if share == 0 or t.numel() == 0:
        return t
    pick = torch.rand(t.shape, generator=gen) < share
    kind = torch.randint(0, 3, t.shape, generator=gen)
    values = torch.tensor([-math.inf, math.nan, math.inf])[kind].to(t.dtype)
    return torch.where(pick.to(t.device), values.to(t.device), t)


# ---- routing ---------------------------------------------------------------------------------

@st.composite
def routing_cases(draw):
    E = draw(st.integers(1, 12))
    return dict(T=draw(st.integers(0, 9)), E=E, K=draw(st.integers(1, E)), seed=draw(seeds), dtype=draw(dtypes),
                logit_specials=draw(st.sampled_from([0.0, 0.2, 1.0])),
                bias=draw(st.sampled_from([None, "finite", "masked", "special"])),
                renormalize=draw(st.booleans()), odd=draw(st.booleans()))


def make_bias(gen, kind, E):
    if kind is None:
        return None
    bias = tensor(gen, E, scale=0.5)
    if kind == "masked":  # -inf masks experts out, possibly all of them
        bias = torch.where(torch.rand(E, generator=gen).to(DEVICE) < 0.5, -math.inf, bias)
    elif kind == "special":
        bias = specials(gen, bias, 0.4)
    return bias


def selectable_mask(logits, bias):
    """The experts the routing may choose for real (the kernel's rule, in torch)."""
    probs = torch.softmax(logits.float().nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf), -1)
    probs = probs.nan_to_num(nan=0.0)
    select = probs if bias is None else probs + bias
    return probs, (probs > 0) & (select > UNSELECTABLE.value), select


@bounded
@given(routing_cases())
def test_route_properties(case):
    gen = torch.Generator().manual_seed(case["seed"])
    T, E, K = case["T"], case["E"], case["K"]
    logits = strided(gen, specials(gen, tensor(gen, T, E, dtype=case["dtype"], scale=2.0), case["logit_specials"]),
                     case["odd"])
    bias = make_bias(gen, case["bias"], E)
    result = kernels.route(logits, K, selection_bias=bias, renormalize=case["renormalize"])
    ids, weights = result.topk_ids.long(), result.topk_weights
    assert ids.shape == weights.shape == (T, K)
    assert ((ids >= 0) & (ids < E)).all(), "ids in range"
    assert (ids.sort(1).values.diff(dim=1) != 0).all(), "a token's K ids are distinct"
    assert torch.isfinite(weights).all() and (weights >= 0).all()

    probs, selectable, select = selectable_mask(logits, bias)
    picked = selectable.gather(1, ids)
    n_selectable = selectable.sum(1, keepdim=True)
    assert torch.equal(picked.sum(1, keepdim=True), n_selectable.clamp(max=K)), \
        "every selectable expert beats every unselectable one"
    assert (weights[~picked] == 0).all(), "spare slots weigh 0"
    order = torch.where(selectable, select, -math.inf)
    best = order.topk(K, dim=1).values
    chosen = order.gather(1, ids).sort(1, descending=True).values
    finite = best > -math.inf
    assert torch.allclose(chosen[finite], best[finite], rtol=1e-5, atol=1e-6), "the K best selection scores"
    ref_weights = torch.where(picked, probs.gather(1, ids), 0.0)
    if case["renormalize"]:
        total = ref_weights.sum(1, keepdim=True)
        ref_weights = ref_weights / torch.where(total > 0, total, 1.0)
        live = picked.any(1)
        assert torch.allclose(weights[live].sum(1), torch.ones(int(live.sum()), device=DEVICE), atol=1e-5)
    assert torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    nan_rows = (logits.isnan() | (logits == math.inf)).any(1)
    assert int(result.nan_tokens) == int(nan_rows.sum())


@bounded
@given(routing_cases())
def test_route_reference_agrees_with_the_kernel(case):
    """Where no two selection scores tie closely, the kernel's ids are the reference's, in order."""
    gen = torch.Generator().manual_seed(case["seed"])
    logits = specials(gen, tensor(gen, case["T"], case["E"], scale=3.0), case["logit_specials"])
    bias = make_bias(gen, case["bias"], case["E"])
    result = kernels.route(logits, case["K"], selection_bias=bias, renormalize=case["renormalize"])
    weights, ids = route_reference(logits, case["K"], selection_bias=bias, renormalize=case["renormalize"])
    _, selectable, select = selectable_mask(logits, bias)
    scores = torch.where(selectable, select, -math.inf).sort(1, descending=True).values
    gaps = scores.diff(dim=1).abs()
    clear = ((gaps > 1e-4) | (scores[:, 1:] == -math.inf)).all(1) if case["E"] > 1 else torch.ones(
        case["T"], dtype=torch.bool, device=DEVICE)
    assert torch.equal(result.topk_ids.long()[clear], ids[clear])
    assert torch.allclose(result.topk_weights[clear], weights[clear], rtol=1e-5, atol=1e-6)


# ---- experts, FFN, attention, gather ---------------------------------------------------------

def distinct_ids(gen, T, E, K):
    if T == 0:
        return torch.empty(0, K, dtype=torch.long, device=DEVICE)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE)


@st.composite
def expert_cases(draw):
    E = draw(st.integers(1, 5))
    return dict(T=draw(st.integers(0, 7)), H=draw(st.integers(1, 9)), I=draw(st.integers(1, 9)), E=E,
                K=draw(st.integers(1, E)), seed=draw(seeds), dtype=draw(dtypes), odd=draw(st.booleans()),
                int32=draw(st.booleans()))


@bounded
@given(expert_cases())
def test_fused_experts_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    T, H, I, E, K, dtype = case["T"], case["H"], case["I"], case["E"], case["K"], case["dtype"]
    x = strided(gen, tensor(gen, T, H, dtype=dtype), case["odd"])
    gate_up = tensor(gen, E, 2 * I, H, dtype=dtype, scale=H ** -0.5)
    down = tensor(gen, E, H, I, dtype=dtype, scale=I ** -0.5)
    ids = distinct_ids(gen, T, E, K).to(torch.int32 if case["int32"] else torch.long)
    weights = torch.rand(T, K, generator=gen).to(DEVICE)
    out = kernels.fused_experts(x, gate_up, down, ids, weights)
    ref = fused_experts_reference(x.double(), gate_up.double(), down.double(), ids.long(), weights.double())
    assert_matches(out, ref, dtype)


@st.composite
def ffn_cases(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    return dict(lead=lead, H=draw(st.integers(1, 9)), I=draw(st.integers(1, 9)), seed=draw(seeds),
                dtype=draw(dtypes), odd=draw(st.booleans()))


@bounded
@given(ffn_cases())
def test_swiglu_ffn_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    H, I, dtype = case["H"], case["I"], case["dtype"]
    x = strided(gen, tensor(gen, *case["lead"], H, dtype=dtype), case["odd"])
    gate_up = tensor(gen, 2 * I, H, dtype=dtype, scale=H ** -0.5)
    down = tensor(gen, H, I, dtype=dtype, scale=I ** -0.5)
    out = kernels.swiglu_ffn(x, gate_up, down)
    assert_matches(out, swiglu_ffn_reference(x.double(), gate_up.double(), down.double()), dtype)


@st.composite
def attention_cases(draw):
    h_kv = draw(st.sampled_from([1, 2]))
    return dict(B=draw(st.integers(1, 2)), H_kv=h_kv, H=h_kv * draw(st.sampled_from([1, 2])),
                S_q=draw(st.integers(0, 9)), S_kv=draw(st.integers(1, 9)), D=draw(st.sampled_from([32, 64])),
                causal=draw(st.booleans()), seed=draw(seeds), dtype=draw(dtypes), odd=draw(st.booleans()))


@bounded
@given(attention_cases())
def test_flash_attention_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, H_kv, D, dtype = case["B"], case["H"], case["H_kv"], case["D"], case["dtype"]
    q = tensor(gen, B, H, case["S_q"], D, dtype=dtype)
    k, v = (tensor(gen, B, H_kv, case["S_kv"], D, dtype=dtype) for _ in range(2))
    if case["odd"]:  # [B, S, H, D] storage seen as [B, H, S, D]: the layout of a fused QKV projection
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    out = kernels.flash_attention(q, k, v, causal=case["causal"])
    assert_matches(out, flash_attention_reference(q.double(), k.double(), v.double(), case["causal"]), dtype)


@bounded
@given(N=st.integers(1, 6), H=st.integers(1, 9), T=st.integers(0, 6), J=st.integers(0, 4), seed=seeds, dtype=dtypes,
       odd=st.booleans())
def test_gather_sum_matches_reference(N, H, T, J, seed, dtype, odd):
    gen = torch.Generator().manual_seed(seed)
    rows = strided(gen, tensor(gen, N, H, dtype=dtype), odd)
    index = torch.randint(-2, N, (T, J), generator=gen).to(DEVICE)  # negatives skip the entry
    out = gather_sum(rows, index)
    ref = gather_sum_reference(rows.double(), index)
    assert out.shape == (T, H) and torch.isfinite(out).all()
    assert rel_error(out, ref) <= REL_TOL[dtype] or ref.abs().max() == 0


# ---- the layer and the routers ---------------------------------------------------------------

@bounded
@given(case=expert_cases(), logit_scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_fused_moe_matches_torch_routing_and_experts(case, logit_scale):
    gen = torch.Generator().manual_seed(case["seed"])
    T, H, I, E, K, dtype = case["T"], case["H"], case["I"], case["E"], case["K"], case["dtype"]
    router = kernels.TopKRouter(tensor(gen, E, H, scale=logit_scale).to(dtype), K)
    layer = kernels.FusedMoE(router, tensor(gen, E, 2 * I, H, dtype=dtype, scale=H ** -0.5),
                             tensor(gen, E, H, I, dtype=dtype, scale=I ** -0.5))
    x = strided(gen, tensor(gen, T, H, dtype=dtype), case["odd"])
    with torch.no_grad():
        out = layer(x)
        logits = x @ router.weight.T
        weights, ids = route_reference(logits, K)
        ref = fused_experts_reference(x.double(), layer.experts.gate_up_proj.double(),
                                      layer.experts.down_proj.double(), ids, weights.double())
    assert_matches(out, ref, dtype)


@bounded
@given(T=st.integers(0, 9), seed=seeds, nan_rows=st.integers(0, 3), quality=st.sampled_from([0.5, 1.0, 10.0]))
def test_energy_aware_router_selection(cost_model, T, seed, nan_rows, quality):  # noqa: F811 (the fixture)
    gen = torch.Generator().manual_seed(seed)
    router = EnergyAwareTTTRouter(ROUTER_H, ROUTER_E, ROUTER_K, cost_model,
                                  objective_weights={"energy": 1.0, "latency": 0.0, "quality": quality},
                                  ttt_update_frequency=4, energy_aware_lr=0.05, device=DEVICE)
    for _ in range(3):  # past batches: the test-time offsets move
        x = tensor(gen, T, ROUTER_H)
        x[:min(nan_rows, T)] = math.nan
        with torch.no_grad():
            logits, weights, ids = router(x)
        ids = ids.long()
        assert ids.shape == weights.shape == (T, ROUTER_K)
        assert ((ids >= 0) & (ids < ROUTER_E)).all() and (ids.sort(1).values.diff(dim=1) != 0).all()
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        live = weights.sum(1) > 0
        assert torch.allclose(weights[live].sum(1), torch.ones(int(live.sum()), device=DEVICE), atol=1e-5)
        assert not live[:min(nan_rows, T)].any(), "an all-NaN token contributes nothing"
        probs = torch.softmax(logits.float(), -1)
        assert torch.allclose(weights[live], (probs.gather(1, ids) / probs.gather(1, ids).sum(1, keepdim=True))[live],
                              rtol=1e-5, atol=1e-6), "gate weights are the unbiased probabilities, renormalised"
    assert torch.isfinite(router.bias_offsets).all()


@pytest.mark.parametrize("fn", ["swiglu_ffn", "fused_experts", "flash_attention", "route", "gather_sum"])
def test_bf16_on_the_cpu_interpreter_is_refused(fn):
    if DEVICE != "cpu":
        pytest.skip("bf16 runs on the GPU")
    x = torch.randn(4, 8).bfloat16()
    calls = {
        "swiglu_ffn": lambda: kernels.swiglu_ffn(x, torch.randn(6, 8).bfloat16(), torch.randn(8, 3).bfloat16()),
        "fused_experts": lambda: kernels.fused_experts(x, torch.randn(2, 6, 8).bfloat16(), torch.randn(2, 8, 3).bfloat16(),
                                                       torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)),
        "flash_attention": lambda: kernels.flash_attention(*(torch.randn(1, 1, 4, 32).bfloat16() for _ in range(3))),
        "route": lambda: kernels.route(x, 2),
        "gather_sum": lambda: gather_sum(x, torch.zeros(2, 1, dtype=torch.long)),
    }
    with pytest.raises(TypeError, match="bfloat16 .*needs a CUDA GPU"):
        calls[fn]()
