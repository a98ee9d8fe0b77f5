"""Fused experts against the per-expert torch loop (transformers' eager MixtralExperts)."""
import pytest
import torch
import triton

import kernels
from bench import tune_moe
from kernels.expert_blocks import DecodeSlots, ExpertBlocks
from kernels.fused_experts import (concatenated_weights, expert_layout, fused_experts_reference, launch_fused_experts,
                                   weight_descriptor)
from kernels.gpt_oss_experts import gpt_oss_weights
from tests.conftest import DEVICE, DTYPES, ON_GPU, assert_matches, randn

# (T, H, I, E, K): what each exercises
SHAPES = [
    pytest.param(1, 48, 40, 8, 2, id="T1-E8-K2"),
    pytest.param(37, 48, 40, 8, 1, id="odd-T-K1"),
    pytest.param(45, 33, 17, 8, 8, id="K=E-odd-H-I"),
    pytest.param(29, 64, 24, 64, 6, id="E64-K6"),
    pytest.param(3, 40, 56, 64, 8, id="E64-K8-most-experts-empty"),
    pytest.param(130, 32, 48, 8, 2, id="multi-block-per-expert"),
]


def expert_weights(E, H, I, dtype):
    return randn(E, 2 * I, H, dtype=dtype, scale=H ** -0.5), randn(E, H, I, dtype=dtype, scale=I ** -0.5)


def random_topk(T, E, K):
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.long)
    return ids.to(DEVICE), torch.rand(T, K).to(DEVICE)


def reference64(x, gate_up, down, ids, weights):
    return fused_experts_reference(x.double(), gate_up.double(), down.double(), ids, weights.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, I, E, K", SHAPES)
def test_fused_experts_matches_reference(T, H, I, E, K, dtype):
    x = randn(T, H, dtype=dtype)
    gate_up, down = expert_weights(E, H, I, dtype)
    ids, weights = random_topk(T, E, K)
    assert_matches(kernels.fused_experts(x, gate_up, down, ids, weights), reference64(x, gate_up, down, ids, weights),
                   dtype)


@pytest.mark.parametrize("routing", ["all-to-one-expert", "two-of-eight-experts", "int32-ids-bf16-weights"])
def test_fused_experts_skewed_routing(routing):
    T, H, I, E, K = 50, 32, 40, 8, 2
    x = randn(T, H)
    gate_up, down = expert_weights(E, H, I, torch.float32)
    ids, weights = random_topk(T, E, K)
    if routing == "all-to-one-expert":
        ids, weights = torch.full((T, K), 3, device=DEVICE)[:, :1], weights[:, :1]  # strided [T, 1] views
    elif routing == "two-of-eight-experts":
        ids = torch.tensor([[1, 6]], device=DEVICE).expand(T, K).contiguous()
    else:
        ids = ids.to(torch.int32)
        weights = weights.to(torch.bfloat16) if ON_GPU else weights.half()
    assert_matches(kernels.fused_experts(x, gate_up, down, ids, weights), reference64(x, gate_up, down, ids, weights),
                   torch.float32)


def test_fused_experts_empty_and_deterministic():
    gate_up, down = expert_weights(8, 32, 24, torch.float32)
    ids, weights = random_topk(0, 8, 2)
    assert kernels.fused_experts(randn(0, 32), gate_up, down, ids, weights).shape == (0, 32)
    x = randn(61, 32)
    ids, weights = random_topk(61, 8, 2)
    first = kernels.fused_experts(x, gate_up, down, ids, weights)
    assert torch.equal(first, kernels.fused_experts(x, gate_up, down, ids, weights)), "run-to-run bitwise equal"


@pytest.mark.parametrize("variant", ["decode-blocks", "prefill-blocks"])
def test_fused_experts_config_variants(variant):
    """Every block shape a config file can pick must give the same answer."""
    cfg = {"decode-blocks": (dict(block_m=16, block_n=32, block_k=64, group_m=1, num_warps=4, num_stages=2),
                             dict(block_n=16, block_k=32, group_m=1, num_warps=4, num_stages=2)),
           "prefill-blocks": (dict(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2),
                              dict(block_n=32, block_k=16, group_m=4, num_warps=4, num_stages=2))}[variant]
    x = randn(70, 48)
    gate_up, down = expert_weights(8, 48, 40, torch.float32)
    ids, weights = random_topk(70, 8, 2)
    out = launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg)
    assert_matches(out, reference64(x, gate_up, down, ids, weights), torch.float32)


TMA_CONFIGS = {
    "tma": (dict(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2, tma=True),
            dict(block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2, tma=True)),
    "tma-wide": (dict(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2, tma=True),
                 dict(block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=2, tma=True)),
}


@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent-config"])
@pytest.mark.parametrize("variant", TMA_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, I, E, K", [(70, 48, 40, 8, 2), (9, 40, 24, 5, 3), (21, 33, 17, 4, 2)],
                         ids=["I-past-block-n", "K-past-block-k", "misaligned-falls-back"])
def test_weight_tiles_through_tensor_descriptors(T, H, I, E, K, dtype, variant, persistent):
    """Weight tiles read by TMA (Hopper's tensor descriptors): the descriptor zero-fills past K and
    past the up rows, and gate rows past I read up rows whose columns are never stored. A layout
    TMA cannot read (rows not 16-byte aligned) falls back to pointers with the same answer."""
    x = randn(T, H, dtype=dtype)
    gate_up, down = expert_weights(E, H, I, dtype)
    ids, weights = random_topk(T, E, K)
    cfg = tuple(c | {"persistent": persistent} for c in TMA_CONFIGS[variant])  # a config may ask for the grid too
    gate_up_view, _ = concatenated_weights(gate_up, down)
    uses_tma = weight_descriptor(gate_up_view, cfg[0])[0] is not None
    assert uses_tma == (H * gate_up.element_size() % 16 == 0), "descriptors exactly where the layout allows"
    out = launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg)
    assert_matches(out, reference64(x, gate_up, down, ids, weights), dtype)


def test_weight_descriptor_refuses_strided_k():
    """gpt-oss's ``x @ w`` layout has K strided: no descriptor (pointers read it)."""
    E, H, I = 4, 32, 16
    gate_up, gate_up_bias = randn(E, H, 2 * I), randn(E, 2 * I)
    down, down_bias = randn(E, I, H), randn(E, H)
    cfg = TMA_CONFIGS["tma"][0]
    for view in gpt_oss_weights(gate_up, gate_up_bias, down, down_bias, 1.702, 7.0):
        assert weight_descriptor(view, cfg) == (None, 0)


@pytest.mark.parametrize("phase", ["decode", "mid", "prefill"])
def test_every_tuner_candidate_gives_the_reference(phase):
    """``bench.tune_moe``'s candidates (TMA and persistent flags included) as config files would
    hold them: each that runs must match the reference. In bf16 on a GPU, as the tuner runs them; a
    tile over the GPU's shared memory (the gate/up kernel loads two weight tiles a stage) is refused
    with Triton's OutOfResources, which the tuner records and skips. fp32 in the interpreter, where
    every candidate runs."""
    T, H, I, E, K = 24, 64, 48, 4, 2
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = randn(T, H, dtype=dtype)
    gate_up, down = expert_weights(E, H, I, dtype)
    ids, weights = random_topk(T, E, K)
    expected = reference64(x, gate_up, down, ids, weights)
    block_m = {"decode": 16, "mid": 32, "prefill": 64}[phase]
    ran = 0
    for tile in tune_moe.BF16_TILES[phase]:
        cfg = tune_moe.candidate_config(tile)
        try:
            out = launch_fused_experts(x, gate_up, down, ids, weights, configs=({"block_m": block_m} | cfg, cfg))
        except triton.runtime.errors.OutOfResources:
            assert ON_GPU, f"{cfg} refused by the interpreter"
            continue
        assert_matches(out, expected, dtype)
        ran += 1
    assert ran >= len(tune_moe.BF16_TILES[phase]) - 1, "at most one candidate may exceed shared memory"


@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_grid_with_mostly_dropped_ids(dtype):
    """An expert-parallel rank's share: most ids belong to other ranks (out of range, both sides).
    The persistent grid loops over the routed tiles only and must give the one-tile-per-program
    grid's answer bit for bit."""
    T, H, I, E, K = 67, 40, 24, 4, 3
    x = randn(T, H, dtype=dtype)
    gate_up, down = expert_weights(E, H, I, dtype)
    ids = torch.randint(-2 * E, 3 * E, (T, K), device=DEVICE)
    ids[0] = -1  # a token routed nowhere here: its row is zeros
    weights = torch.rand(T, K, device=DEVICE)
    cfg = (dict(block_m=16, block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2),
           dict(block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2))
    persistent = launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg, persistent=True)
    assert torch.equal(persistent, launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg))
    assert torch.equal(persistent[0], torch.zeros_like(persistent[0]))
    assert_matches(persistent, reference64(x, gate_up, down, ids, weights), dtype)


DECODE_CFG = (dict(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=2),
              dict(block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [[5, 0, 7, 2], [3, -1, 9, 3], [-1, -1, 8, -3], [1, 2, 3, 4, 5, 6, 7, 0] + [4] * 7 + [6]],
                         ids=["distinct", "dropped-and-repeated", "all-dropped", "16-slots-repeats"])
def test_one_token_reads_the_ids_without_a_layout(ids, dtype):
    """One token takes ``DecodeSlots`` (no layout launch): each slot's program finds its expert's
    slots. Repeated ids (each slot counted, as the reference does), ids out of range (dropped)
    and a token routed nowhere must give the grouped layout's answer bit for bit."""
    E, H, I = 8, 40, 24
    x = randn(1, H, dtype=dtype)
    gate_up, down = expert_weights(E, H, I, dtype)
    top_k_index = torch.tensor([ids], device=DEVICE)
    weights = torch.rand(1, len(ids), device=DEVICE)
    assert isinstance(expert_layout(top_k_index, E, DECODE_CFG[0], False), DecodeSlots)
    decode = launch_fused_experts(x, gate_up, down, top_k_index, weights, configs=DECODE_CFG)
    grouped_cfg = ({**DECODE_CFG[0], "decode_slots": False}, DECODE_CFG[1])
    assert isinstance(expert_layout(top_k_index, E, grouped_cfg[0], False), ExpertBlocks)
    assert torch.equal(decode, launch_fused_experts(x, gate_up, down, top_k_index, weights, configs=grouped_cfg))
    assert_matches(decode, reference64(x, gate_up, down, top_k_index, weights), dtype)
    routed = any(0 <= i < E for i in ids)
    if not routed:
        assert torch.equal(decode, torch.zeros_like(decode))
    x[0, 3] = float("nan")  # a poisoned token stays poisoned wherever it is routed
    poisoned = launch_fused_experts(x, gate_up, down, top_k_index, weights, configs=DECODE_CFG)
    assert poisoned.isnan().all() if routed else torch.equal(poisoned, torch.zeros_like(poisoned))


def test_more_slots_than_a_row_block_or_tokens_take_the_grouped_layout():
    one_token_many_slots = torch.arange(20, device=DEVICE)[None] % 8
    assert isinstance(expert_layout(one_token_many_slots, 8, DECODE_CFG[0], False), ExpertBlocks)
    two_tokens = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    assert isinstance(expert_layout(two_tokens, 8, DECODE_CFG[0], False), ExpertBlocks)
    assert isinstance(expert_layout(two_tokens[:1], 8, DECODE_CFG[0], True), ExpertBlocks), "persistent"


def test_fused_experts_gradients_match_reference():
    x = randn(9, 16).requires_grad_()
    gate_up, down = (w.requires_grad_() for w in expert_weights(4, 16, 8, torch.float32))
    ids, weights = random_topk(9, 4, 2)
    weights.requires_grad_()
    grad_out = randn(9, 16)
    inputs = (x, gate_up, down, weights)
    ours = torch.autograd.grad(kernels.fused_experts(x, gate_up, down, ids, weights), inputs, grad_out)
    ref = torch.autograd.grad(fused_experts_reference(x, gate_up, down, ids, weights), inputs, grad_out)
    for g, r in zip(ours, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


def _args():
    x = randn(6, 16)
    gate_up, down = expert_weights(4, 16, 8, torch.float32)
    ids, weights = random_topk(6, 4, 2)
    return dict(hidden_states=x, gate_up_proj=gate_up, down_proj=down, top_k_index=ids, top_k_weights=weights)


BAD_INPUT = [
    ("top_k_index", lambda a: a | dict(top_k_index=torch.zeros(6, 5, dtype=torch.long, device=DEVICE),
                                       top_k_weights=torch.rand(6, 5, device=DEVICE)), ValueError),  # K > E
    ("top_k_index", lambda a: a | dict(top_k_index=a["top_k_index"] + 4), ValueError),  # out of range
    ("top_k_index", lambda a: a | dict(top_k_index=a["top_k_index"] - 4), ValueError),  # negative
    ("top_k_index", lambda a: a | dict(top_k_index=a["top_k_index"].float()), TypeError),
    ("top_k_index", lambda a: a | dict(top_k_index=a["top_k_index"][:5]), ValueError),
    ("top_k_weights", lambda a: a | dict(top_k_weights=a["top_k_weights"][:, :1]), ValueError),
    ("top_k_weights", lambda a: a | dict(top_k_weights=a["top_k_weights"].long()), TypeError),
    ("gate_up_proj", lambda a: a | dict(gate_up_proj=a["gate_up_proj"][:, :, :15]), ValueError),
    ("gate_up_proj", lambda a: a | dict(gate_up_proj=a["gate_up_proj"][:, :15]), ValueError),
    ("gate_up_proj", lambda a: a | dict(gate_up_proj=a["gate_up_proj"].half()), TypeError),
    ("down_proj", lambda a: a | dict(down_proj=a["down_proj"][:3]), ValueError),
    ("down_proj", lambda a: a | dict(down_proj=a["down_proj"][:, :, :7]), ValueError),
    ("hidden_states", lambda a: a | dict(hidden_states=a["hidden_states"][None]), ValueError),
    ("gate_up_proj", lambda a: a | dict(gate_up_proj=a["gate_up_proj"][:0], down_proj=a["down_proj"][:0],
                                        top_k_index=a["top_k_index"][:, :0], top_k_weights=a["top_k_weights"][:, :0]),
     ValueError),  # zero experts
    ("gate_up_proj", lambda a: a | dict(gate_up_proj=a["gate_up_proj"][:, :0], down_proj=a["down_proj"][..., :0]),
     ValueError),  # I = 0
    ("validate_ids", lambda a: a | dict(validate_ids="no"), TypeError),  # a truthy string would validate
    ("validate_ids", lambda a: a | dict(validate_ids=None), TypeError),
    ("top_k_index", lambda a: a | dict(top_k_index=a["top_k_index"].to("meta")), ValueError),  # no ids to check
]


@pytest.mark.parametrize("name, corrupt, error", BAD_INPUT, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUT)])
def test_fused_experts_bad_input(name, corrupt, error):
    with pytest.raises(error, match=name):
        kernels.fused_experts(**corrupt(_args()))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device to mix devices")
def test_fused_experts_mixed_devices():
    args = _args()
    with pytest.raises(ValueError, match="top_k_index"):
        kernels.fused_experts(**args | dict(top_k_index=args["top_k_index"].cpu()))
