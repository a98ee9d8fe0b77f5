"""The dense-kernel benchmark cases: each of our ops beside its torch peer, at the issue's shapes.

Shared by ``python -m bench.kernels`` (a printed table and a results file) and the
pytest-benchmark file ``bench/bench_kernels.py``.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels


@dataclass
class DenseCase:
    name: str
    peer_name: str
    shape: dict
    flops: float
    make_inputs: Callable  # (device, dtype, generator) -> tuple of tensors
    ours: Callable
    peer: Callable
    target_ratio: Optional[float] = None  # required peer_time / our_time, where the issue sets one


def _randn(generator, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)


def swiglu_eager(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The eager peer, as transformers runs it: one cuBLAS gate_up matmul, SiLU·up, the down matmul."""
    gate, up = (x @ gate_up_proj.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down_proj.T


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_default(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with torch's own backend choice: the strongest SDPA peer."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def attention_qk_av(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return kernels.attention_av(kernels.attention_qk(q, k), v, causal=True)


def matmul_softmax_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The materialised peer of attention_qk + attention_av: cuBLAS QKᵀ, fp32 softmax, cuBLAS ·V."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1, dtype=torch.float32)
    return probs.to(v.dtype) @ v


def swiglu_case(T: int, H: int, I: int, target_ratio: float | None = None) -> DenseCase:
    def make(device: torch.device | str, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (_randn(gen, device, dtype, T, H), _randn(gen, device, dtype, 2 * I, H, scale=H ** -0.5),
                _randn(gen, device, dtype, H, I, scale=I ** -0.5))
    return DenseCase(f"swiglu_ffn T{T} H{H} I{I}", "eager torch (cuBLAS + SiLU·mul)", dict(T=T, H=H, I=I),
                     6.0 * T * H * I, make, kernels.swiglu_ffn, swiglu_eager, target_ratio)


def projection_case(name: str, T: int, K: int, N: int) -> DenseCase:
    def make(device: torch.device | str, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return _randn(gen, device, dtype, T, K), _randn(gen, device, dtype, N, K, scale=K ** -0.5)
    return DenseCase(f"{name} T{T} K{K} N{N}", "torch matmul (cuBLAS)", dict(T=T, K=K, N=N), 2.0 * T * K * N,
                     make, kernels.matmul, lambda x, w: x @ w.T)


def attention_case(B: int, H: int, S: int, D: int, target_ratio: float | None = None, split: bool = False,
                   H_kv: int | None = None, peer: str = "default") -> DenseCase:
    H_kv = H_kv or H

    def make(device: torch.device | str, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (_randn(gen, device, dtype, B, H, S, D), _randn(gen, device, dtype, B, H_kv, S, D),
                _randn(gen, device, dtype, B, H_kv, S, D))
    flops = 4.0 * B * H * S * S * D / 2  # causal: half the score matrix
    shape = dict(B=B, H=H, H_kv=H_kv, S=S, D=D, causal=True)
    if split:
        return DenseCase(f"attention_qk+av causal B{B} H{H} S{S} D{D}", "torch matmul + softmax + matmul", shape,
                         flops, make, attention_qk_av, matmul_softmax_matmul)
    peer_fn, peer_name = {"default": (sdpa_default, "torch SDPA (default backend)"),
                          "flash": (sdpa_flash, "torch SDPA (flash backend)")}[peer]
    name = f"flash_attention causal B{B} H{H}" + (f"/{H_kv}" if H_kv != H else "") + f" S{S} D{D} vs {peer}"
    return DenseCase(name, peer_name, shape, flops, make, lambda q, k, v: kernels.flash_attention(q, k, v), peer_fn,
                     target_ratio)


# decode: Llama-3-8B's FFN (4096 x 14336, a 117 MB gate weight from HBM) and 2048 x 5632 (23 MB, half in L2),
# from 1 to 64 tokens; Triton compiles a row count of 1 as a constant, so one token runs another program than 2
DECODE_TOKENS = (1, 2, 4, 16, 64)


def decode_cases() -> list[DenseCase]:
    """Decode-sized projections and SwiGLU FFNs beside cuBLAS: weight-read bound, the graph ratio matters."""
    cases = []
    for T in DECODE_TOKENS:
        cases += [projection_case("ffn_gate", T, 4096, 14336), projection_case("ffn_down", T, 5632, 2048),
                  swiglu_case(T, 4096, 14336, target_ratio=1.0)]
    return cases


def gpu_cases() -> list[DenseCase]:
    """The benchmark shapes, with the issues' targets as ratios (issue 17: flash attention >= 0.95x SDPA's
    default backend at B8 H32 S2048 D128, SwiGLU >= 1.0x eager at every shape), then ``decode_cases``."""
    return [
        attention_case(8, 32, 2048, 128, target_ratio=0.95),
        attention_case(8, 32, 2048, 128, target_ratio=0.9, peer="flash"),
        attention_case(4, 16, 4096, 64),
        attention_case(8, 8, 512, 32),
        attention_case(8, 32, 2048, 128, H_kv=8),
        attention_case(4, 16, 2048, 128, split=True),
        swiglu_case(4096, 4096, 14336, target_ratio=1.0),
        swiglu_case(16384, 4096, 14336, target_ratio=1.0),
        swiglu_case(4096, 256, 1024, target_ratio=1.2),
        projection_case("ffn_gate", 4096, 4096, 14336),
        projection_case("ffn_down", 4096, 14336, 4096),
        projection_case("ffn_down", 4096, 1024, 256),
        *decode_cases(),
    ]


def cpu_cases() -> list[DenseCase]:
    """Small shapes for the interpreter: correctness only."""
    return [
        attention_case(1, 2, 67, 64),
        attention_case(1, 4, 33, 32, H_kv=2),
        attention_case(1, 2, 40, 32, split=True),
        swiglu_case(37, 64, 96),
        projection_case("ffn_down", 37, 96, 64),
    ]
