"""FP8 experts: ``fused_experts`` with e4m3 weights and per-output-channel scales.

The weights keep transformers' layout, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I],
in ``float8_e4m3fn``, beside float32 scales ``gate_up_scale`` [E, 2I] and ``down_scale`` [E, H]:
one per output channel (``kernels.quantize``), so a scale factors out of each dot product and the
kernels apply it in the GEMM epilogue. Two ways to run them, picked per call from the block config
(``quantize_activations`` in ``configs/moe_gate_up_fp8``):

- W8A8 (the default): the tokens and then the intermediate are quantized per row (``quantize_fp8``,
  two extra launches) and the GEMMs run on FP8 tensor cores, at twice bf16's peak;
- weight-only (W8A16): the 16-bit activations stay as they are and each FP8 weight tile is widened
  in registers. It reads the same weight bytes, but the widening costs more than the two
  quantizations, at decode too (``bench.fp8_moe`` times both), so only a config that asks gets it.

Everything else (the grouping by expert, the gated epilogue, the fixed-order sum over slots) is
``kernels.fused_experts``'. ``FusedMoE.quantize_fp8()`` converts a layer.
"""
import torch

from kernels import config as _config
from kernels._library import kernel_op
from kernels.fused_experts import ExpertWeights, check_routing, fused_experts_reference, run_experts
from kernels.quantize import FP8_DTYPE, dequantize_fp8, quantize_fp8_reference
from kernels.validate import check_dim, check_fp8_capability, check_fp8_device, check_same_device, check_tensor

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
WEIGHT_CHUNK_ELEMENTS = 1 << 26  # quantize_fp8_weights converts this many weights at a time (bounds its float32 copy)


def quantize_fp8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert weight [E, N, K] (float32/float16/bfloat16, any device) as (e4m3 [E, N, K], float32
    scales [E, N]), one scale per output channel; converted a few experts at a time, so the float32
    working copy stays small. Non-finite weights are refused (they would poison every token)."""
    check_tensor("weight", weight, ndim=3, kernel_device=False)
    if weight.is_meta:
        raise ValueError("weight is on meta: it holds no values to convert (load or materialize it first)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or infinite values, which FP8 cannot scale")
    E, N, K = weight.shape
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty((E, N), dtype=torch.float32, device=weight.device)
    step = max(1, WEIGHT_CHUNK_ELEMENTS // max(N * K, 1))
    for first in range(0, E, step):
        q[first:first + step], scale[first:first + step] = quantize_fp8_reference(weight[first:first + step])
    return q, scale


def fp8_expert_configs(hidden_states: torch.Tensor, num_experts: int, intermediate: int, n_slots: int) -> tuple:
    """(gate_up config, down config) of the FP8 GEMMs for this shape on this device."""
    return _config.lookup_each(("moe_gate_up_fp8", "moe_down_fp8"), hidden_states.device,
                               slots_per_expert=n_slots // num_experts, e=num_experts, i=intermediate)


def fp8_weights(gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor, down_proj: torch.Tensor,
                down_scale: torch.Tensor) -> tuple[ExpertWeights, ExpertWeights]:
    """The kernel's view of FP8 experts in transformers' layout (``concatenated_weights`` with scales)."""
    I = gate_up_proj.shape[1] // 2
    return (ExpertWeights(gate_up_proj[:, :I], up_offset=I * gate_up_proj.stride(1), glu="silu", scale=gate_up_scale,
                          scale_up_offset=I),
            ExpertWeights(down_proj, scale=down_scale))


def launch_fp8_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                       down_proj: torch.Tensor, down_scale: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """``fp8_experts`` on validated inputs (no host sync); ``configs`` overrides the files. Refuses a
    GPU without FP8 (a cached check: the op's launcher is where compiled code meets it)."""
    check_fp8_capability("hidden_states", hidden_states)
    E, two_i, _ = gate_up_proj.shape
    configs = configs or fp8_expert_configs(hidden_states, E, two_i // 2, topk_ids.numel())
    return run_experts(hidden_states, *fp8_weights(gate_up_proj, gate_up_scale, down_proj, down_scale), topk_ids,
                       topk_weights, configs, quantize_activations=configs[0].get("quantize_activations", False))


def fp8_experts_reference(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                          down_proj: torch.Tensor, down_scale: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, quantize_activations: bool = False) -> torch.Tensor:
    """``fp8_experts`` in torch: the dequantized weights through ``fused_experts_reference``; with
    ``quantize_activations`` the tokens and each slot's intermediate round-trip through FP8 per row,
    as the W8A8 kernels compute (fp32 throughout, rounded to ``hidden_states``' dtype at the end)."""
    x = hidden_states.float()
    gate_up, down = dequantize_fp8(gate_up_proj, gate_up_scale), dequantize_fp8(down_proj, down_scale)
    if not quantize_activations:
        return fused_experts_reference(x, gate_up, down, top_k_index, top_k_weights).to(hidden_states.dtype)

    def round_trip(rows: torch.Tensor) -> torch.Tensor:  # rows in the kernel's dtype, then through FP8
        return dequantize_fp8(*quantize_fp8_reference(rows.to(hidden_states.dtype)))
    return fused_experts_reference(round_trip(x), gate_up, down, top_k_index, top_k_weights.float(),
                                   round_trip).to(hidden_states.dtype)


def check_fp8_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                      down_proj: torch.Tensor, down_scale: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, validate_ids: bool = True) -> None:
    """Validate the ``fp8_experts`` arguments (``validate_ids`` range-checks ids: one device sync)."""
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=ACTIVATION_DTYPES, kernel_device=False)
    for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        check_tensor(name, weight, ndim=3, dtypes=(FP8_DTYPE,), kernel_device=False)
    for name, scale in (("gate_up_scale", gate_up_scale), ("down_scale", down_scale)):
        check_tensor(name, scale, ndim=2, dtypes=(torch.float32,), kernel_device=False)
    check_same_device(hidden_states=hidden_states, gate_up_proj=gate_up_proj, gate_up_scale=gate_up_scale,
                      down_proj=down_proj, down_scale=down_scale)
    E, two_i, H = gate_up_proj.shape
    check_dim("gate_up_proj", gate_up_proj, 2, hidden_states.shape[1], "the hidden size of hidden_states")
    if E == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H] with E, I >= 1 (gate rows, then up rows), "
                         f"got shape {tuple(gate_up_proj.shape)}")
    if tuple(down_proj.shape) != (E, H, two_i // 2):
        raise ValueError(f"down_proj must have shape {(E, H, two_i // 2)} (from gate_up_proj), "
                         f"got {tuple(down_proj.shape)}")
    for name, scale, shape in (("gate_up_scale", gate_up_scale, (E, two_i)), ("down_scale", down_scale, (E, H))):
        if tuple(scale.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (one scale per output channel of each expert), "
                             f"got {tuple(scale.shape)}")
        if scale.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along dim 1, got strides {scale.stride()}")
    check_fp8_device("hidden_states", hidden_states)  # last: shapes are checked on any device
    check_routing(hidden_states, E, top_k_index, top_k_weights, validate_ids)


def fp8_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                down_proj: torch.Tensor, down_scale: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, validate_ids: bool = True) -> torch.Tensor:
    """``fused_experts`` with FP8 weights (``quantize_fp8_weights`` makes them).

    Args:
        hidden_states: [T, H] float16/bfloat16 on a CUDA GPU with FP8 (compute capability >= 8.9).
        gate_up_proj: [E, 2I, H] float8_e4m3fn, gate rows first; gate_up_scale [E, 2I] float32.
        down_proj: [E, H, I] float8_e4m3fn; down_scale [E, H] float32.
        top_k_index, top_k_weights, validate_ids: as ``fused_experts``.
    Returns:
        [T, H] in ``hidden_states``' dtype. No autograd: the FP8 weights are for inference.
    """
    check_fp8_experts(hidden_states, gate_up_proj, gate_up_scale, down_proj, down_scale, top_k_index,
                      top_k_weights, validate_ids)
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        raise RuntimeError("fp8_experts has no backward: call it under torch.no_grad() or torch.inference_mode()")
    return _fp8_experts_op(hidden_states, gate_up_proj, gate_up_scale, down_proj, down_scale, top_k_index,
                           top_k_weights)


_fp8_experts_op = kernel_op(
    "fp8_experts",
    "(Tensor hidden_states, Tensor gate_up_proj, Tensor gate_up_scale, Tensor down_proj, Tensor down_scale, "
    "Tensor top_k_index, Tensor top_k_weights) -> Tensor",
    launch_fp8_experts, fake=lambda x, *weights_and_routing: torch.empty_like(x))
