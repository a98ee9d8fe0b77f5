"""FP8 (e4m3) quantization per row: ``x ≈ q * scale[..., None]`` with one float32 scale per row.

Each row's scale is its largest magnitude over 448 (e4m3's largest finite value), so the row's
extreme element maps to ±448 and the others round to nearest-even on e4m3's grid; an all-zero row
gets scale 1. The FP8 experts (``kernels.fp8_experts``) use it twice: once when they convert
their weights (a row is one output channel of one expert: per-output-channel scales) and, for
large batches, on every call for their activations (a row is one token, or one token's slot).

A NaN or an infinity in a row makes that row's scale (and so its dequantized values) non-finite,
as the same input makes the bf16 path's output non-finite: poisoned tokens stay poisoned.
"""
import torch
import triton
import triton.language as tl

from kernels._library import kernel_op
from kernels.tiles import cdiv, next_power_of_2
from kernels.validate import check_fp8_capability, check_fp8_device, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
ROWS_PER_PROGRAM = 4


@triton.jit
def _quantize_rows_kernel(p_x, p_q, p_scale, M, K, stride_xm, stride_qm,
                          FP8_LIMIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """q[m, :] = x[m, :] / scale[m], scale[m] = max|x[m, :]| / FP8_LIMIT (1 for a zero row), for BLOCK_M rows."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < M
    p_rows = p_x + o_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    b_amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: each row's largest magnitude
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_rows + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :], other=0.0).to(tl.float32)
        b_has_nan = tl.max((b_x != b_x).to(tl.int32), axis=1) > 0  # tl.max skips NaN: carry it to the scale
        b_chunk_amax = tl.where(b_has_nan, float("nan"), tl.max(tl.abs(b_x), axis=1))
        b_amax = tl.maximum(b_amax, b_chunk_amax, propagate_nan=tl.PropagateNan.ALL)
    b_scale = b_amax / FP8_LIMIT
    b_scale = tl.where(b_scale == 0.0, 1.0, b_scale)  # [BM]; a zero row quantizes to zeros
    tl.store(p_scale + o_m, b_scale, mask=m_m)
    for k0 in range(0, K, BLOCK_K):  # pass 2: the rows on e4m3's grid (the re-read hits L2)
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_mk = m_m[:, None] & (o_k < K)[None, :]
        b_x = tl.load(p_rows + o_k[None, :], mask=m_mk, other=0.0).to(tl.float32)
        b_q = tl.clamp(b_x / b_scale[:, None], -FP8_LIMIT, FP8_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        tl.store(p_q + o_m.to(tl.int64)[:, None] * stride_qm + o_k[None, :], b_q.to(p_q.dtype.element_ty), mask=m_mk)


def launch_quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` on a validated [M, K] ``x`` with unit stride along K (no host sync)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.fill_(1.0)
    block_k = min(1024, next_power_of_2(K))
    _quantize_rows_kernel[(cdiv(M, ROWS_PER_PROGRAM),)](
        x, q, scale, M, K, x.stride(0), q.stride(0), FP8_LIMIT=FP8_MAX, BLOCK_M=ROWS_PER_PROGRAM, BLOCK_K=block_k)
    return q, scale


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to FP8 e4m3 on our Triton kernel.

    Args:
        x: [M, K] float32/float16/bfloat16 on a CUDA GPU with FP8 (compute capability >= 8.9).
    Returns:
        (q [M, K] float8_e4m3fn, scale [M] float32) with ``x ≈ q.float() * scale[:, None]``.
    """
    check_tensor("x", x, ndim=2)
    check_fp8_device("x", x)
    return _quantize_fp8_op(x if x.stride(1) == 1 else x.contiguous())


def quantize_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` in torch over the last dim of any [..., K] tensor, on any device:
    (q [..., K] float8_e4m3fn, scale [...] float32)."""
    x = x.float()
    amax = x.abs().amax(dim=-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
    scale = torch.where(amax == 0, 1.0, amax / FP8_MAX)
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale[..., None]`` in ``dtype``: what the FP8 values stand for."""
    return (q.float() * scale[..., None]).to(dtype)


def _quantize_fake(x):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(x.shape[:1], dtype=torch.float32)


def _checked_launch(x):
    check_fp8_capability("x", x)
    return launch_quantize_fp8(x)


_quantize_fp8_op = kernel_op("quantize_fp8", "(Tensor x) -> (Tensor, Tensor)", _checked_launch, fake=_quantize_fake)
