"""Top-k routing and the expert-grouped layout against torch, with their invariants."""
import math

import numpy as np
import pytest
import torch

import kernels
from kernels.expert_blocks import group_by_expert
from kernels.routing import route_reference
from tests.conftest import DEVICE, DTYPES, ON_GPU, randn

# (T, E, K): what each exercises
SHAPES = [
    pytest.param(1, 8, 2, id="T1-mixtral"),
    pytest.param(37, 8, 1, id="odd-T-K1"),
    pytest.param(33, 64, 6, id="E64-K6"),
    pytest.param(5, 64, 8, id="E64-K8"),
    pytest.param(7, 8, 8, id="K=E"),
    pytest.param(70, 128, 8, id="qwen3-E128"),
]


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, E, K", SHAPES)
def test_route_matches_torch(T, E, K, dtype, renormalize):
    logits = randn(T, E, dtype=dtype)
    result = kernels.route(logits, K, renormalize=renormalize)
    weights, ids = route_reference(logits, K, renormalize=renormalize)
    assert result.topk_ids.dtype == torch.int32 and result.topk_weights.dtype == torch.float32
    # 16-bit logits tie often; the chosen probabilities must equal torch's, whichever tied id is taken
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(probs.gather(1, result.topk_ids.long()), probs.gather(1, ids))
    assert (result.topk_ids.sort(1).values[:, 1:] != result.topk_ids.sort(1).values[:, :-1]).all(), "distinct ids"
    assert torch.allclose(result.topk_weights, weights, rtol=1e-6, atol=1e-7)
    assert int(result.nan_tokens) == 0


def test_ties_go_to_the_lowest_expert_index():
    logits = torch.zeros(3, 8, device=DEVICE)
    logits[:, 5] = 1.0
    result = kernels.route(logits, 3)
    assert result.topk_ids.tolist() == [[5, 0, 1]] * 3


@pytest.mark.parametrize("T, E, K", SHAPES)
def test_selection_bias_moves_selection_not_weights(T, E, K):
    logits = randn(T, E)
    zero = kernels.route(logits, K, selection_bias=torch.zeros(E, device=DEVICE))
    plain = kernels.route(logits, K)
    assert torch.equal(zero.topk_ids, plain.topk_ids) and torch.equal(zero.topk_weights, plain.topk_weights)

    bias = torch.zeros(E, device=DEVICE)
    bias[E - 1] = 10.0  # forces expert E-1 into every token's selection
    biased = kernels.route(logits, K, selection_bias=bias, renormalize=False)
    assert (biased.topk_ids == E - 1).any(dim=1).all()
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.allclose(biased.topk_weights, probs.gather(1, biased.topk_ids.long()), rtol=1e-6, atol=1e-7), \
        "gate weights must be the unbiased probabilities of the chosen experts"
    weights, ids = route_reference(logits, K, selection_bias=bias, renormalize=False)
    assert torch.equal(biased.topk_ids.long(), ids)


def test_nan_policy_mask_and_raise():
    logits = randn(4, 8)
    logits[1, 3] = float("nan")  # one NaN: expert 3 is never chosen for token 1
    logits[1, 3 - 1] = 50.0
    logits[2] = float("nan")  # all NaN: the token contributes nothing
    result = kernels.route(logits, 2)
    assert int(result.nan_tokens) == 2
    assert not (result.topk_ids[1] == 3).any()
    assert torch.isfinite(result.topk_weights).all()
    assert torch.equal(result.topk_weights[2], torch.zeros(2, device=DEVICE))
    weights, ids = route_reference(logits, 2)
    assert torch.equal(result.topk_ids[[0, 1, 3]].long(), ids[[0, 1, 3]])
    with pytest.raises(ValueError, match="router_logits contains NaN"):
        kernels.route(logits, 2, nan_policy="raise")


def test_masked_experts_keep_ids_distinct_and_weigh_nothing():
    """-inf biases (masked experts) leaving fewer than K selectable: distinct ids, spare slots at weight 0."""
    logits = randn(6, 2)
    one_left = kernels.route(logits, 2, selection_bias=torch.tensor([0.0, -math.inf], device=DEVICE))
    assert one_left.topk_ids.tolist() == [[0, 1]] * 6
    assert torch.allclose(one_left.topk_weights, torch.tensor([[1.0, 0.0]] * 6, device=DEVICE), rtol=1e-6, atol=0), \
        "renormalised over the selectable expert; the spare slot weighs exactly 0"
    assert (one_left.topk_weights[:, 1] == 0).all()
    none_left = kernels.route(randn(6, 4), 2, selection_bias=torch.full((4,), -math.inf, device=DEVICE))
    assert none_left.topk_ids.tolist() == [[0, 1]] * 6, "the lowest unchosen indices"
    assert torch.equal(none_left.topk_weights, torch.zeros(6, 2, device=DEVICE))
    nan_bias = torch.tensor([math.nan, 0.0, 0.0, 0.0], device=DEVICE)  # NaN masks like -inf, in both
    logits = randn(5, 4)
    logits[:, 0] = 10.0
    result = kernels.route(logits, 2, selection_bias=nan_bias, renormalize=False)
    weights, ids = route_reference(logits, 2, selection_bias=nan_bias, renormalize=False)
    assert not (result.topk_ids == 0).any() and torch.equal(result.topk_ids.long(), ids)
    assert torch.allclose(result.topk_weights, weights)


def test_all_neg_inf_logits_weigh_nothing_in_the_kernel_the_reference_and_the_gradient_path():
    logits = torch.full((3, 4), -math.inf, device=DEVICE)
    logits[0] = randn(4)
    result = kernels.route(logits, 2)
    weights, ids = route_reference(logits, 2)
    assert torch.equal(result.topk_weights[1:], torch.zeros(2, 2, device=DEVICE))
    assert torch.equal(weights[1:], torch.zeros(2, 2, device=DEVICE)) and torch.equal(result.topk_ids.long(), ids)
    router = kernels.TopKRouter(randn(4, 8), 2)
    x = randn(3, 8).requires_grad_()
    with torch.no_grad():
        router.weight[:, 0] = 1e30  # huge logits; +Inf in float32 for the positive rows
    _, grad_weights, _ = router(x)
    _, plain_weights, _ = router(x.detach())
    assert torch.allclose(grad_weights, plain_weights), "the training path keeps the kernel's NaN/Inf policy"


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_selection_bias_is_read_with_its_strides(layout):
    E = 8
    logits = randn(9, E)
    dense = randn(2 * E, scale=0.3)[::2] if layout == "strided" else torch.tensor([0.2], device=DEVICE).expand(E)
    result = kernels.route(logits, 2, selection_bias=dense)
    expected = kernels.route(logits, 2, selection_bias=dense.contiguous())
    assert torch.equal(result.topk_ids, expected.topk_ids) and torch.equal(result.topk_weights, expected.topk_weights)


@pytest.mark.parametrize("E, width", [(60, 64), (60, 60), (5, 7), (120, 128)])
def test_logits_are_read_with_their_row_stride(E, width):
    """The row stride is a compile-time constant of the kernel (a runtime one that is no multiple
    of 16 cost 1.7-3x on an H100): column slices of wider logits and unpadded rows alike."""
    logits = randn(37, width)[:, :E]
    result = kernels.route(logits, 4)
    weights, ids = route_reference(logits, 4)
    assert torch.equal(result.topk_ids.long(), ids)
    assert torch.allclose(result.topk_weights, weights, rtol=1e-6, atol=1e-7)


def test_nan_policy_raise_counts_positive_infinity_like_the_mask():
    logits = randn(3, 4)
    logits[1, 2] = math.inf
    assert int(kernels.route(logits, 2).nan_tokens) == 1
    with pytest.raises(ValueError, match="NaN or \\+Inf"):
        kernels.route(logits, 2, nan_policy="raise")


def test_numpy_integer_top_k_is_an_int():
    logits = randn(5, 8)
    assert torch.equal(kernels.route(logits, np.int64(3)).topk_ids, kernels.route(logits, 3).topk_ids)


BAD_ROUTE = [
    ("top_k", lambda x: dict(router_logits=x, top_k=9), ValueError),
    ("top_k", lambda x: dict(router_logits=x, top_k=0), ValueError),
    ("top_k", lambda x: dict(router_logits=x, top_k=2.0), TypeError),
    ("router_logits", lambda x: dict(router_logits=x[0], top_k=2), ValueError),
    ("router_logits", lambda x: dict(router_logits=x.long(), top_k=2), TypeError),
    ("router_logits", lambda x: dict(router_logits=x.T, top_k=2), ValueError),
    ("selection_bias", lambda x: dict(router_logits=x, top_k=2, selection_bias=torch.zeros(7, device=x.device)),
     ValueError),
    ("selection_bias", lambda x: dict(router_logits=x, top_k=2, selection_bias=torch.zeros(8, device=x.device).half()),
     TypeError),
    ("nan_policy", lambda x: dict(router_logits=x, top_k=2, nan_policy="ignore"), ValueError),
    ("top_k", lambda x: dict(router_logits=x, top_k=np.float64(2)), TypeError),
    ("top_k", lambda x: dict(router_logits=x, top_k=True), TypeError),
    ("router_logits", lambda x: dict(router_logits=x[:, :0], top_k=1), ValueError),
    ("router_logits", lambda x: dict(router_logits=x.cpu().bfloat16() if not ON_GPU else x.cpu(), top_k=2),
     TypeError if not ON_GPU else ValueError),
    ("renormalize", lambda x: dict(router_logits=x, top_k=2, renormalize="no"), TypeError),
    ("renormalize", lambda x: dict(router_logits=x, top_k=2, renormalize=None), TypeError),
    ("renormalize", lambda x: dict(router_logits=x, top_k=2, renormalize=1), TypeError),
]


@pytest.mark.parametrize("name, make, error", BAD_ROUTE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_ROUTE)])
def test_route_bad_input(name, make, error):
    with pytest.raises(error, match=name):
        kernels.route(**make(randn(8, 8)))


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture needs a CUDA device (none found)")
def test_routing_is_graph_capturable():
    logits = randn(16, 64)
    bias = torch.zeros(64, device=DEVICE)
    kernels.route(logits, 8, bias)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.route(logits, 8, bias)
        blocks = group_by_expert(captured.topk_ids, 64, 16)
    logits.copy_(randn(16, 64))
    graph.replay()
    weights, ids = route_reference(logits, 8)
    assert torch.equal(captured.topk_ids.long(), ids)
    assert int(blocks.expert_counts.sum()) == 16 * 8
