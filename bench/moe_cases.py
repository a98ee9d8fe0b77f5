"""The fused-MoE benchmark cases: our fused experts beside the HF per-expert loop and
``torch._grouped_mm``, at the Mixtral, Qwen3-30B-A3B and OLMoE expert shapes.

Shared by ``python -m bench.moe``, ``bench.fp8_moe``, ``bench.profile_moe`` and ``bench/bench_moe.py``
(with the FP8 experts' calls, ``fp8_calls``). Routing is drawn from a random router (softmax top-k of
Gaussian logits), so expert loads look like a real, untrained router's.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from kernels.fp8_experts import fp8_expert_configs, launch_fp8_experts
from kernels.fused_experts import fused_experts_reference


@dataclass(frozen=True)
class MoeShape:
    name: str
    E: int
    K: int
    H: int
    I: int
    renormalize: bool


SHAPES = {
    "mixtral": MoeShape("mixtral", 8, 2, 4096, 14336, True),
    "qwen3": MoeShape("qwen3", 128, 8, 2048, 768, True),
    "olmoe": MoeShape("olmoe", 64, 8, 2048, 1024, False),
}
GPU_TOKENS = {"mixtral": (1, 16, 128, 1024, 4096, 16384), "qwen3": (1, 16, 128, 1024, 8192),
              "olmoe": (1, 16, 128, 1024, 8192)}
CPU_SHAPES = {"tiny-E8-K2": MoeShape("tiny-E8-K2", 8, 2, 48, 40, True),
              "tiny-E64-K8": MoeShape("tiny-E64-K8", 64, 8, 32, 24, False)}
CPU_TOKENS = (1, 37)


def layer_weights(shape: MoeShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(router [E, H], gate_up [E, 2I, H], down [E, H, I]), random and the same for a seed on every rank; router
    logits ~ N(0, 1) on N(0, 1) inputs, as from a trained router (unscaled, they would be ~sqrt(H) and the
    gates one-hot, hiding what re-routing changes)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)
    return (randn(shape.E, shape.H, scale=shape.H ** -0.5), randn(shape.E, 2 * shape.I, shape.H, scale=shape.H ** -0.5),
            randn(shape.E, shape.H, shape.I, scale=shape.I ** -0.5))


def make_inputs(shape: MoeShape, T: int, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights) with random data."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)
    x = randn(T, shape.H)
    gate_up = randn(shape.E, 2 * shape.I, shape.H, scale=shape.H ** -0.5)
    down = randn(shape.E, shape.H, shape.I, scale=shape.I ** -0.5)
    routing = kernels.route(torch.randn(T, shape.E, generator=gen, device=device), shape.K,
                            renormalize=shape.renormalize)
    return x, gate_up, down, routing.topk_ids, routing.topk_weights


def ours(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
         weights: torch.Tensor) -> torch.Tensor:
    return kernels.fused_experts(x, gate_up, down, ids, weights, validate_ids=False)


def hf_loop(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager per-expert loop (``experts_implementation="eager"``)."""
    return fused_experts_reference(x, gate_up, down, ids, weights)


def grouped_mm(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """Sort slots by expert, two ``torch._grouped_mm`` calls, weight, scatter-add: no host sync."""
    T, K = ids.shape
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tokens = order // K
    gate, up = torch._grouped_mm(x[tokens], gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def flops(shape: MoeShape, T: int) -> float:
    return 6.0 * T * shape.K * shape.H * shape.I


def floor_ms(shape: MoeShape, ids: torch.Tensor, dtype: torch.dtype, bytes_per_s: float,
             scale_bytes: int = 0) -> tuple:
    """Bytes of the touched experts' weights in ``dtype`` (with ``scale_bytes`` per output channel:
    FP8's float32 scales) over the measured copy bandwidth (the decode floor), and how many experts."""
    distinct = torch.unique(ids).numel()
    per_expert = 3 * shape.H * shape.I * torch.finfo(dtype).bits / 8 + scale_bytes * (2 * shape.I + shape.H)
    return distinct * per_expert / bytes_per_s * 1e3, distinct


def fp8_calls(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> dict:
    """{"fp8": the config's choice, "w8a16": weight-only, "w8a8": quantized activations}, as no-argument calls."""
    (q_gate_up, s_gate_up), (q_down, s_down) = kernels.quantize_fp8_weights(gate_up), kernels.quantize_fp8_weights(down)
    cfg_gate_up, cfg_down = fp8_expert_configs(x, gate_up.shape[0], down.shape[2], ids.numel())
    args = (x, q_gate_up, s_gate_up, q_down, s_down, ids, weights)

    def forced(w8a8: bool) -> Callable[[], torch.Tensor]:
        return lambda: launch_fp8_experts(*args, configs=({**cfg_gate_up, "quantize_activations": w8a8}, cfg_down))
    return {"fp8": lambda: kernels.fp8_experts(*args, validate_ids=False), "w8a16": forced(False), "w8a8": forced(True),
            "mode": "w8a8" if cfg_gate_up.get("quantize_activations") else "w8a16"}
