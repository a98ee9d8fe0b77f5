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
from kernels.dependent_launch import dependent_launch, wait_for_prior_kernel
from kernels.tiles import cdiv, next_power_of_2
from kernels.validate import check_fp8_capability, check_fp8_device, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
ROWS_PER_PROGRAM = 4
ONE_PASS_MAX_K = 8192  # fp32 elements a program holds in registers (8 warps: 32 a thread)


@triton.jit
def _row_amax(b_x):
    """[BM] largest magnitude of each row of [BM, BK] ``b_x``; NaN where the row has one (tl.max skips NaN)."""
    b_has_nan = tl.max((b_x != b_x).to(tl.int32), axis=1) > 0
    return tl.where(b_has_nan, float("nan"), tl.max(tl.abs(b_x), axis=1))


@triton.jit
def _store_scales(p_scale, b_amax, o_m, m_m, FP8_LIMIT: tl.constexpr):
    """[BM] scale = amax / FP8_LIMIT (1 for a zero row, which quantizes to zeros), stored and returned."""
    b_scale = b_amax / FP8_LIMIT
    b_scale = tl.where(b_scale == 0.0, 1.0, b_scale)
    tl.store(p_scale + o_m, b_scale, mask=m_m)
    return b_scale


@triton.jit
def _store_quantized(p_q, b_x, b_scale, o_m, o_k, m_mk, stride_qm, FP8_LIMIT: tl.constexpr):
    """q[o_m, o_k] = x / scale on e4m3's grid (clamped; NaN kept)."""
    b_q = tl.clamp(b_x / b_scale[:, None], -FP8_LIMIT, FP8_LIMIT, propagate_nan=tl.PropagateNan.ALL)
    tl.store(p_q + o_m.to(tl.int64)[:, None] * stride_qm + o_k[None, :], b_q.to(p_q.dtype.element_ty), mask=m_mk)


@triton.jit
def _quantize_rows_kernel(p_x, p_q, p_scale, M, K, stride_xm, stride_qm, FP8_LIMIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """q[m, :] = x[m, :] / scale[m], scale[m] = max|x[m, :]| / FP8_LIMIT (1 for a zero row), for BLOCK_M rows.
    ONE_PASS (BLOCK_K >= K): each row is loaded once and quantized from registers; else two passes of
    BLOCK_K chunks, the second re-reading the rows (from L2)."""
    wait_for_prior_kernel(PDL)
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < M
    p_rows = p_x + o_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    if ONE_PASS:
        o_k = tl.arange(0, BLOCK_K)
        m_mk = m_m[:, None] & (o_k < K)[None, :]
        b_x = tl.load(p_rows + o_k[None, :], mask=m_mk, other=0.0).to(tl.float32)  # [BM, BK]: whole rows
        b_scale = _store_scales(p_scale, _row_amax(b_x), o_m, m_m, FP8_LIMIT)
        _store_quantized(p_q, b_x, b_scale, o_m, o_k, m_mk, stride_qm, FP8_LIMIT)
    else:
        b_amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # pass 1: each row's largest magnitude
            o_k = k0 + tl.arange(0, BLOCK_K)
            b_x = tl.load(p_rows + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :], other=0.0).to(tl.float32)
            b_amax = tl.maximum(b_amax, _row_amax(b_x), propagate_nan=tl.PropagateNan.ALL)
        b_scale = _store_scales(p_scale, b_amax, o_m, m_m, FP8_LIMIT)
        for k0 in range(0, K, BLOCK_K):  # pass 2: the rows on e4m3's grid (the re-read hits L2)
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_mk = m_m[:, None] & (o_k < K)[None, :]
            b_x = tl.load(p_rows + o_k[None, :], mask=m_mk, other=0.0).to(tl.float32)
            _store_quantized(p_q, b_x, b_scale, o_m, o_k, m_mk, stride_qm, FP8_LIMIT)


def quantize_plan(M: int, K: int, one_pass_max_k: int = ONE_PASS_MAX_K) -> dict:
    """The launch of ``quantize_fp8`` on [M, K] (M, K > 0): rows per program, chunk width, one pass or two,
    warps. A row of up to ``one_pass_max_k`` elements is held in registers whole: read once, one load."""
    if next_power_of_2(K) <= one_pass_max_k:
        block_k = next_power_of_2(K)
        block_m = max(1, min(ROWS_PER_PROGRAM, next_power_of_2(M), ONE_PASS_MAX_K // block_k))
        return {"BLOCK_M": block_m, "BLOCK_K": block_k, "ONE_PASS": True,
                "num_warps": 8 if block_m * block_k >= 4096 else 4}
    return {"BLOCK_M": ROWS_PER_PROGRAM, "BLOCK_K": 1024, "ONE_PASS": False, "num_warps": 4}


def launch_quantize_fp8(x: torch.Tensor, one_pass_max_k: int = ONE_PASS_MAX_K) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` on a validated [M, K] ``x`` with unit stride along K (no host sync);
    ``one_pass_max_k`` 0 forces two passes (for comparison)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.fill_(1.0)
    plan = quantize_plan(M, K, one_pass_max_k)
    pdl = dependent_launch(x.device)
    _quantize_rows_kernel[(cdiv(M, plan["BLOCK_M"]),)](x, q, scale, M, K, x.stride(0), q.stride(0),
                                                      FP8_LIMIT=FP8_MAX, PDL=pdl, launch_pdl=pdl, **plan)
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
