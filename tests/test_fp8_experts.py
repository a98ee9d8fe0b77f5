"""FP8 quantization and the FP8 experts: against their torch references, conversion, loading, bad input.

Triton's CPU interpreter has no FP8, so the kernels run on an FP8 GPU only; conversion, state
dicts and argument checks run everywhere.
"""
import gc
import importlib
import weakref

import pytest
import torch

import kernels
from kernels.fp8_experts import WEIGHT_CHUNK_ELEMENTS, fp8_expert_configs, fp8_experts_reference, launch_fp8_experts
from kernels.fused_experts import fused_experts_reference
from kernels.moe_layer import Fp8Experts
from kernels.quantize import (FP8_DTYPE, FP8_MAX, ONE_PASS_MAX_K, ROWS_PER_PROGRAM, dequantize_fp8,
                              launch_quantize_fp8, quantize_fp8_reference, quantize_plan)
from kernels.validate import gpu_has_fp8
from tests.conftest import DEVICE, ON_GPU, assert_matches, randn, rel_error
from tests.test_fused_experts import random_topk

FP8_GPU = gpu_has_fp8()
requires_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")
ACTIVATION_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# e4m3 keeps 3 mantissa bits: a value rounds by at most 2^-4 of itself (half an ulp), so a row
# scaled to its largest magnitude dequantizes within 2^-4 relative of each normal element
E4M3_HALF_ULP = 2.0 ** -4
# FP8 against the unquantized experts: each e4m3-rounded operand adds about 3% RMS relative error
# (measured 4.4-4.8% with the two weights rounded, 6.2-7.1% with the tokens and intermediate too, on
# an H100); a wrong scale or layout gives errors of order 1
FP8_VS_BF16_REL_ERROR = {"w8a16": 0.06, "w8a8": 0.09}
# W8A8 rounds the intermediate to FP8 from the kernel's bf16 intermediate, the reference from its
# own: a few elements may round to the neighbouring e4m3 value (2^-3 apart), hence bf16's tolerance twice
W8A8_REL_TOL = 2e-2
# (T, H, I, E, K): what each exercises
SHAPES = [
    pytest.param(1, 64, 48, 8, 2, id="decode-T1"),
    pytest.param(37, 80, 56, 8, 1, id="odd-T-K1"),
    pytest.param(29, 64, 32, 64, 6, id="E64-K6"),
    pytest.param(300, 96, 64, 8, 2, id="many-tokens-per-expert"),
]
W8A16_CONFIGS = ({"block_m": 16, "block_n": 32, "block_k": 32, "group_m": 1, "num_warps": 4, "num_stages": 2,
                  "quantize_activations": False}, {"block_n": 32, "block_k": 32, "group_m": 1, "num_warps": 4,
                                                   "num_stages": 2})
W8A8_CONFIGS = ({**W8A16_CONFIGS[0], "block_m": 64, "quantize_activations": True}, W8A16_CONFIGS[1])


def fp8_weights(E, H, I, device=DEVICE):
    gate_up = torch.randn(E, 2 * I, H, device=device) * H ** -0.5
    down = torch.randn(E, H, I, device=device) * I ** -0.5
    return (*kernels.quantize_fp8_weights(gate_up), *kernels.quantize_fp8_weights(down)), (gate_up, down)


# ---- quantization (torch, any device) ----

def test_quantize_reference_rounds_each_row_within_half_an_ulp():
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 7)[:, None]  # rows of very different magnitudes
    x[3] = 0.0
    q, scale = quantize_fp8_reference(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.shape == (7,) and scale.dtype == torch.float32
    assert scale[3] == 1.0 and not q[3].float().any(), "a zero row: scale 1, zeros"
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]], torch.full((6,), FP8_MAX)), \
        "each row's largest magnitude maps to 448"
    normal = x.abs() >= scale[:, None] * 2.0 ** -6  # e4m3's smallest normal
    error = (dequantize_fp8(q, scale) - x).abs()
    assert (error[normal] <= E4M3_HALF_ULP * x.abs()[normal] * (1 + 1e-6)).all()


def test_quantize_reference_poisoned_rows_stay_poisoned():
    x = torch.randn(3, 16)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    values = dequantize_fp8(*quantize_fp8_reference(x))
    assert torch.isfinite(values[0]).all() and values[1].isnan().any() and not torch.isfinite(values[2]).all()


def test_quantize_fp8_weights_per_output_channel_in_chunks(monkeypatch):
    weight = torch.randn(5, 12, 40, dtype=torch.float16)
    q, scale = kernels.quantize_fp8_weights(weight)
    assert q.shape == (5, 12, 40) and scale.shape == (5, 12)
    ref_q, ref_scale = quantize_fp8_reference(weight)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)
    # the module, not the function ``kernels.fp8_experts`` that shadows its name on the package
    monkeypatch.setattr(importlib.import_module("kernels.fp8_experts"), "WEIGHT_CHUNK_ELEMENTS", 12 * 40 * 2)
    chunked_q, chunked_scale = kernels.quantize_fp8_weights(weight)
    assert torch.equal(chunked_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(chunked_scale, scale)
    assert WEIGHT_CHUNK_ELEMENTS >= 1 << 20, "the default chunk converts whole experts of real models"


@pytest.mark.parametrize("bad, error, match", [
    ("nan", ValueError, "NaN or infinite"), ("int", TypeError, "weight has dtype"),
    ("2d", ValueError, "weight must have 3 dimensions"), ("list", TypeError, "weight must be a torch.Tensor"),
    ("meta", ValueError, "weight is on meta")])
def test_quantize_fp8_weights_bad_input(bad, error, match):
    weight = {"nan": torch.tensor([[[1.0, float("nan")]]]), "int": torch.ones(2, 3, 4, dtype=torch.int32),
              "2d": torch.ones(3, 4), "list": [[[1.0]]], "meta": torch.empty(2, 3, 4, device="meta")}[bad]
    with pytest.raises(error, match=match):
        kernels.quantize_fp8_weights(weight)


# ---- argument checks (shapes on any device; the kernels need an FP8 GPU) ----

def _fp8_args(T=4, H=32, I=16, E=4, K=2, device=DEVICE):
    (gate_up, gate_up_scale, down, down_scale), _ = fp8_weights(E, H, I, device)
    ids, weights = random_topk(T, E, K)
    return dict(hidden_states=torch.randn(T, H, device=device).to(torch.bfloat16 if ON_GPU else torch.float16),
                gate_up_proj=gate_up, gate_up_scale=gate_up_scale, down_proj=down, down_scale=down_scale,
                top_k_index=ids.to(device), top_k_weights=weights.to(device))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {"gate_up_scale": a["gate_up_scale"][:, :-1]}, ValueError, "gate_up_scale must have shape"),
    (lambda a: {"down_scale": a["down_scale"].T.contiguous()}, ValueError, "down_scale must have shape"),
    (lambda a: {"down_scale": a["down_scale"].half()}, TypeError, "down_scale has dtype"),
    (lambda a: {"gate_up_proj": a["gate_up_proj"].float()}, TypeError, "gate_up_proj has dtype"),
    (lambda a: {"down_proj": a["down_proj"][:, :, :-1]}, ValueError, "down_proj must have shape"),
    (lambda a: {"hidden_states": a["hidden_states"].float()}, TypeError, "hidden_states has dtype"),
    (lambda a: {"hidden_states": a["hidden_states"][:, :-1]}, ValueError, "hidden_states"),
    (lambda a: {"gate_up_scale": a["gate_up_scale"].T.contiguous().T}, ValueError, "unit stride"),
])
def test_fp8_experts_bad_input_names_the_argument(change, error, match):
    args = _fp8_args()
    args.update(change(args))
    with pytest.raises(error, match=match):
        kernels.fp8_experts(**args)


@pytest.mark.skipif(FP8_GPU, reason="the refusal of a device without FP8")
def test_fp8_kernels_refuse_a_device_without_fp8():
    args = _fp8_args()
    with pytest.raises(ValueError, match="FP8"):
        kernels.fp8_experts(**args)
    with pytest.raises(ValueError, match="FP8"):
        kernels.quantize_fp8(args["hidden_states"])


def test_a_gpu_without_fp8_is_refused_naming_it(monkeypatch):
    """The launchers' check (the CPU has no GPU below 8.9 to try, so a stand-in tensor on "cuda:0")."""
    from kernels import validate
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    validate._fp8_capability.cache_clear()
    on_a100 = type("OnCuda", (), {"device": torch.device("cuda", 0)})()
    try:
        with pytest.raises(ValueError, match=r"NVIDIA A100-SXM4-80GB \(compute capability 8.0\), which has no FP8"):
            validate.check_fp8_capability("x", on_a100)
    finally:
        validate._fp8_capability.cache_clear()


# ---- the layer: conversion, state dicts, moves ----

def _layer(E=4, H=32, I=16, dtype=torch.float16):
    router = kernels.TopKRouter(torch.randn(E, H, dtype=dtype), 2)
    gate_up, down = torch.randn(E, 2 * I, H, dtype=dtype) * 0.2, torch.randn(E, H, I, dtype=dtype) * 0.2
    return kernels.FusedMoE(router, gate_up, down)


def test_quantize_fp8_converts_once_and_frees_the_16bit_weights():
    layer = _layer()
    old = weakref.ref(layer.experts.gate_up_proj)
    gate_up = layer.experts.gate_up_proj.detach().clone()
    assert layer.quantize_fp8() is layer and isinstance(layer.experts, Fp8Experts)
    gc.collect()
    assert old() is None, "the replaced 16-bit weights are freed"
    experts = layer.experts
    assert layer.quantize_fp8().experts is experts, "converting twice is a no-op"
    q, scale = kernels.quantize_fp8_weights(gate_up)
    assert torch.equal(experts.gate_up_proj.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(experts.gate_up_proj_scale, scale)


def test_fp8_layer_state_dict_round_trip_and_16bit_checkpoints():
    source = _layer()
    bf16_state = {k: v.clone() for k, v in source.state_dict().items()}  # what an HF checkpoint holds
    source.quantize_fp8()
    state = source.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if k.startswith("experts.")} == {
        "experts.gate_up_proj": (FP8_DTYPE, (4, 32, 32)), "experts.gate_up_proj_scale": (torch.float32, (4, 32)),
        "experts.down_proj": (FP8_DTYPE, (4, 32, 16)), "experts.down_proj_scale": (torch.float32, (4, 32))}
    for checkpoint in (state, bf16_state):
        target = _layer().quantize_fp8()
        target.load_state_dict(checkpoint)
        for key in ("experts.gate_up_proj", "experts.down_proj"):
            assert torch.equal(target.state_dict()[key].view(torch.uint8), state[key].view(torch.uint8))
            assert torch.equal(target.state_dict()[f"{key}_scale"], state[f"{key}_scale"])


def test_fp8_layer_keeps_its_dtypes_through_casts():
    layer = _layer().quantize_fp8()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.experts.gate_up_proj.dtype == FP8_DTYPE and layer.experts.down_proj_scale.dtype == torch.float32
    assert layer.gate.weight.dtype == torch.float16, "the router still casts as it did"


def test_from_hf_and_patch_take_a_weight_dtype():
    with pytest.raises(ValueError, match="weight_dtype"):
        kernels.patch_hf_model(torch.nn.Linear(2, 2), weight_dtype="int4")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64, head_dim=16)
    model = transformers.Qwen3MoeForCausalLM(config)
    expert_weight = weakref.ref(model.model.layers[0].mlp.experts.gate_up_proj)
    keys = set(model.state_dict())
    assert kernels.patch_hf_model(model, weight_dtype="fp8") == 2
    gc.collect()
    assert expert_weight() is None, "each block's 16-bit expert weights are freed as it is replaced"
    state = model.state_dict()
    assert set(state) == keys | {f"model.layers.{n}.mlp.experts.{w}_scale" for n in (0, 1)
                                 for w in ("gate_up_proj", "down_proj")}
    assert state["model.layers.1.mlp.experts.down_proj"].dtype == FP8_DTYPE


# ---- the kernels (FP8 GPU) ----

@requires_fp8_gpu
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES)
@pytest.mark.parametrize("T, H, I, E, K", SHAPES)
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_fp8_experts_match_reference(T, H, I, E, K, dtype, mode):
    (gate_up, gate_up_scale, down, down_scale), (gate_up_16, down_16) = fp8_weights(E, H, I)
    x = randn(T, H, dtype=dtype)
    ids, weights = random_topk(T, E, K)
    configs = W8A8_CONFIGS if mode == "w8a8" else W8A16_CONFIGS
    out = launch_fp8_experts(x, gate_up, gate_up_scale, down, down_scale, ids, weights, configs)
    ref = fp8_experts_reference(x, gate_up, gate_up_scale, down, down_scale, ids, weights, mode == "w8a8")
    if mode == "w8a16":
        assert_matches(out, ref, dtype)
    else:
        assert torch.isfinite(out).all() and rel_error(out, ref) <= W8A8_REL_TOL
    unquantized = fused_experts_reference(x.float(), gate_up_16, down_16, ids, weights)
    assert rel_error(out, unquantized) <= FP8_VS_BF16_REL_ERROR[mode]


@requires_fp8_gpu
def test_fp8_experts_files_configs_empty_and_poisoned_tokens():
    args = _fp8_args(T=50, H=64, I=48, E=8)
    out = kernels.fp8_experts(**args)
    w8a8 = fp8_expert_configs(args["hidden_states"], 8, 48, args["top_k_index"].numel())[0]["quantize_activations"]
    ref = fp8_experts_reference(*args.values(), quantize_activations=w8a8)
    assert rel_error(out, ref) <= W8A8_REL_TOL
    args["hidden_states"][7, 3] = float("nan")
    poisoned = kernels.fp8_experts(**args)
    assert poisoned[7].isnan().all() and torch.isfinite(poisoned[torch.arange(50) != 7]).all()
    empty = _fp8_args(T=0, H=64, I=48, E=8)
    assert kernels.fp8_experts(**empty).shape == (0, 64)


@requires_fp8_gpu
@pytest.mark.parametrize("one_pass_max_k", [ONE_PASS_MAX_K, 0], ids=["default", "two_passes"])
@pytest.mark.parametrize("M, K", [(1, 1), (5, 3000), (33, 64), (0, 8), (1, 4096), (3, 8192), (2, 9000)])
def test_quantize_fp8_kernel_matches_reference(M, K, one_pass_max_k):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
    if M > 2:
        x[2] = 0.0
    if M > 1:
        x[1, K - 1] = float("nan")  # a row's last element: in the masked tail of a one-pass row's block
    q, scale = launch_quantize_fp8(x, one_pass_max_k)
    ref_q, ref_scale = quantize_fp8_reference(x)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    finite = ref_scale.isfinite()
    assert torch.equal(q[finite].view(torch.uint8), ref_q[finite].view(torch.uint8))
    assert q[~finite].float().isnan().all()  # a poisoned row stays poisoned


@pytest.mark.parametrize("M, K", [(1, 1), (1, 2048), (1, 4096), (64, 3000), (4096, 8192), (2, 8193), (7, 14336)])
def test_quantize_plan_holds_rows_of_up_to_one_pass_max_k_in_registers(M, K):
    plan = quantize_plan(M, K)
    assert plan["ONE_PASS"] == (K <= ONE_PASS_MAX_K)
    if plan["ONE_PASS"]:
        assert plan["BLOCK_K"] >= K and plan["BLOCK_M"] * plan["BLOCK_K"] <= ONE_PASS_MAX_K
    else:
        assert plan["BLOCK_K"] < K
    assert 1 <= plan["BLOCK_M"] <= ROWS_PER_PROGRAM and (M > 1 or plan["BLOCK_M"] == 1)
    assert not quantize_plan(M, K, one_pass_max_k=0)["ONE_PASS"]


@requires_fp8_gpu
def test_fp8_layer_captures_in_a_cuda_graph():
    """No host sync on the FP8 path (routing, quantizations, GEMMs): a graph replay sees new tokens."""
    layer = _layer(E=8, H=64, I=48, dtype=torch.bfloat16).cuda().quantize_fp8()
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        x.copy_(torch.randn(16, 64, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        assert torch.equal(captured, layer(x))


@requires_fp8_gpu
def test_fp8_ops_pass_opcheck_and_compile_with_fullgraph():
    args = _fp8_args(T=5, H=32, I=24, E=4)
    # not test_schema: its mutation check compares FP8 inputs with torch.allclose, which has no FP8 kernel
    torch.library.opcheck(torch.ops.energy_moe.fp8_experts.default, tuple(args.values()),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.energy_moe.quantize_fp8.default, (args["hidden_states"],))
    torch._dynamo.reset()
    layer = _layer(E=4, H=32, I=24, dtype=torch.bfloat16).cuda().quantize_fp8()
    x = torch.randn(3, 5, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), eager)
