"""Plain Triton GEMM ``y = x @ weight.T`` (nn.Linear layout), with an optional SwiGLU epilogue.

One kernel serves both the single projections (``ffn_gate``, ``ffn_up``, ``ffn_down``) and the
fused gate+up projection: with ``FUSE_SWIGLU`` each program also accumulates the matching "up"
rows (``weight[N + n]``) and writes ``silu(gate) * up``, so the [T, 2I] intermediate never
reaches memory.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import config as _config
from kernels._autograd import apply_with_reference_grad
from kernels.validate import check_dim, check_same_dtype_device, check_tensor, dot_precision, tma_compatible
from kernels.tiles import cdiv, tile_coords, tile_product


@triton.jit
def _matmul_kernel(
    p_x, p_w, p_y,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, FUSE_SWIGLU: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pointer-based tiles: any strides, any alignment."""
    i_m, i_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # rows and columns wrap modulo M and N, so loads need no mask; the store masks them
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    o_k = tl.arange(0, BLOCK_K)
    p_xb = p_x + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk  # [BM, BK]
    p_wb = p_w + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk  # [BK, BN]

    # with FUSE_SWIGLU the up rows sit N rows below the gate rows in the stacked [2N, K] weight
    b_acc = tile_product(p_xb, p_wb, K, stride_xk, stride_wk, N * stride_wn,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, FUSE_SWIGLU, DOT_PRECISION)

    o_ym = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_yn = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_yb = p_y + o_ym[:, None] * stride_ym + o_yn[None, :] * stride_yn
    tl.store(p_yb, b_acc.to(p_y.dtype.element_ty), mask=(o_ym[:, None] < M) & (o_yn[None, :] < N))


@triton.jit
def _matmul_tma_kernel(
    d_x, d_w, d_y,
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_SWIGLU: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Tensor-descriptor (TMA on Hopper) tiles. Out-of-range reads are zero-filled and out-of-range
    writes dropped by the descriptors, so there are no masks. A grid smaller than the tile count
    makes the kernel persistent: each program walks tiles with a stride of the grid size."""
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for i_tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i_m, i_n = tile_coords(i_tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = i_m * BLOCK_M, i_n * BLOCK_N
        b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FUSE_SWIGLU:
            b_acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
            b_x = d_x.load([off_m, k0])  # [BM, BK]
            b_w = d_w.load([off_n, k0])  # [BN, BK]
            b_acc = tl.dot(b_x, b_w.T, b_acc, input_precision=DOT_PRECISION)
            if FUSE_SWIGLU:
                # gate columns past N read up rows here, but those output columns are never stored
                b_w_up = d_w.load([N + off_n, k0])
                b_acc_up = tl.dot(b_x, b_w_up.T, b_acc_up, input_precision=DOT_PRECISION)
        if FUSE_SWIGLU:
            b_acc = b_acc * tl.sigmoid(b_acc) * b_acc_up
        d_y.store([off_m, off_n], b_acc.to(d_y.dtype))


def processor_count(device: torch.device) -> int | None:
    """Streaming multiprocessors on a GPU; CPU cores under the interpreter (it runs programs serially)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return os.cpu_count()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_matmul(x: torch.Tensor, weight: torch.Tensor, fuse_swiglu: bool = False,
                  cfg: dict | None = None) -> torch.Tensor:
    """Launch on validated 2-D inputs: ``x`` [M, K], ``weight`` [N, K] ([2N, K] fused); ``cfg`` overrides the file."""
    M, K = x.shape
    N = weight.shape[0] // 2 if fuse_swiglu else weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()  # an empty sum; silu(0) * 0 is 0 too
    cfg = cfg or _config.lookup("swiglu_gate_up" if fuse_swiglu else "matmul", x.device, m=M, n=N, k=K,
                             elem_bytes=x.element_size())
    n_tiles = cdiv(M, cfg["block_m"]) * cdiv(N, cfg["block_n"])
    if cfg.get("tma") and tma_compatible(x, weight, y):
        _launch_tma(x, weight, y, fuse_swiglu, cfg, n_tiles)
        return y
    _matmul_kernel[(n_tiles,)](
        x, weight, y, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        EVEN_K=K % cfg["block_k"] == 0, FUSE_SWIGLU=fuse_swiglu, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def _launch_tma(x, weight, y, fuse_swiglu, cfg, n_tiles):
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    grid = (min(n_tiles, processor_count(x.device)) if cfg.get("persistent") else n_tiles,)
    _matmul_tma_kernel[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]), y.shape[0], y.shape[1], x.shape[1],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["group_m"], FUSE_SWIGLU=fuse_swiglu,
        DOT_PRECISION=dot_precision(x.dtype), WARP_SPECIALIZE=bool(cfg.get("warp_specialize")),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def check_projection(x_name: str, x: torch.Tensor, w_name: str, weight: torch.Tensor) -> None:
    """Validate ``x`` [..., K] against a projection ``weight`` [N, K]."""
    check_tensor(x_name, x)
    check_tensor(w_name, weight, ndim=2)
    check_same_dtype_device(**{x_name: x, w_name: weight})
    if x.dim() == 0:
        raise ValueError(f"{x_name} must have at least 1 dimension, got a scalar")
    check_dim(w_name, weight, 1, x.shape[-1], f"the last dim of {x_name}")


def matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in torch."""
    return x @ weight.T


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with the Triton GEMM.

    Args:
        x: [..., K] float32, float16 or bfloat16.
        weight: [N, K], same dtype and device.
    Returns:
        [..., N] in ``x``'s dtype (fp32 accumulation).
    """
    check_projection("x", x, "weight", weight)
    return apply_with_reference_grad(_matmul_2d, matmul_reference, x, weight)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [prod(...), K] (a view when strides allow; well-defined when K is 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _matmul_2d(x, weight):
    return launch_matmul(as_rows(x), weight).reshape(*x.shape[:-1], weight.shape[0])
