"""The GEMM tile helpers our kernels share (``kernels.matmul``, ``kernels.fused_experts``): which
output tile a program computes, and the K loop of a tile's product, plain or gated, with the weight
tiles read through pointers or a tensor descriptor; and the launchers' host arithmetic."""
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. ``triton.cdiv`` is a constexpr function whose wrapper costs about a
    microsecond a call, and an eager decode step of the fused experts made eight such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), on the host (``cdiv`` says why not triton's)."""
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def tile_coords(i_tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each weight column-tile while it sits in L2."""
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    i_group = i_tile // (GROUP_M * n_tiles_n)
    first_m = i_group * GROUP_M
    group_size = min(n_tiles_m - first_m, GROUP_M)
    i_m = first_m + (i_tile % group_size)
    i_n = (i_tile % (GROUP_M * n_tiles_n)) // group_size
    return i_m, i_n


@triton.jit
def x_tile(p_xb, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The [BM, BK] x tile ``p_xb`` at K offset ``k0``, zeros past K."""
    if EVEN_K:
        b_x = tl.load(p_xb)
    else:
        b_x = tl.load(p_xb, mask=(tl.arange(0, BLOCK_K) < K - k0)[None, :], other=0.0)
    return b_x


@triton.jit
def tile_products(p_xb, p_wb, K, stride_xk, stride_wk, up_offset,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, WITH_UP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """([BM, BN] fp32 sum over K of x tiles ``p_xb`` [BM, BK] times weight tiles ``p_wb`` [BK, BN],
    and with WITH_UP the same for the "up" weight tiles ``up_offset`` elements further on; zeros
    without): the two halves of a gated projection, before its activation. Weights of another
    dtype than x (FP8 weights under 16-bit activations) are widened to x's dtype in registers."""
    o_k = tl.arange(0, BLOCK_K)
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b_x = x_tile(p_xb, k0, K, BLOCK_K, EVEN_K)
        if EVEN_K:
            b_w = tl.load(p_wb)
        else:
            m_k = o_k < K - k0
            b_w = tl.load(p_wb, mask=m_k[:, None], other=0.0)
        b_acc = tl.dot(b_x, b_w.to(b_x.dtype), b_acc, input_precision=DOT_PRECISION)
        if WITH_UP:
            if EVEN_K:
                b_w_up = tl.load(p_wb + up_offset)
            else:
                b_w_up = tl.load(p_wb + up_offset, mask=m_k[:, None], other=0.0)
            b_acc_up = tl.dot(b_x, b_w_up.to(b_x.dtype), b_acc_up, input_precision=DOT_PRECISION)
        p_xb += BLOCK_K * stride_xk
        p_wb += BLOCK_K * stride_wk
    return b_acc, b_acc_up


@triton.jit
def tile_product(p_xb, p_wb, K, stride_xk, stride_wk, up_offset,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, FUSE_SWIGLU: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BM, BN] fp32 x·w over K (``tile_products``); with FUSE_SWIGLU silu(gate) * up."""
    b_acc, b_acc_up = tile_products(p_xb, p_wb, K, stride_xk, stride_wk, up_offset, BLOCK_M, BLOCK_N, BLOCK_K,
                                     EVEN_K, FUSE_SWIGLU, DOT_PRECISION)
    if FUSE_SWIGLU:
        b_acc = b_acc * tl.sigmoid(b_acc) * b_acc_up  # silu(gate) * up, in fp32
    return b_acc


@triton.jit
def tile_products_tma(p_xb, d_w, i_e, off_n, up_rows, K, stride_xk,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       WITH_UP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``tile_products`` with the weight tiles from a [E, rows, K] tensor descriptor ``d_w`` (TMA on
    Hopper): expert ``i_e``'s rows ``off_n`` on, the "up" rows ``up_rows`` further on. The descriptor
    zero-fills past K and past its rows; x tiles ``p_xb`` [BM, BK] are gathered rows, so pointers."""
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b_x = x_tile(p_xb, k0, K, BLOCK_K, EVEN_K)
        b_w = d_w.load([i_e, off_n, k0]).reshape(BLOCK_N, BLOCK_K)  # [BN, BK]
        b_acc = tl.dot(b_x, b_w.to(b_x.dtype).T, b_acc, input_precision=DOT_PRECISION)
        if WITH_UP:
            b_w_up = d_w.load([i_e, up_rows + off_n, k0]).reshape(BLOCK_N, BLOCK_K)
            b_acc_up = tl.dot(b_x, b_w_up.to(b_x.dtype).T, b_acc_up, input_precision=DOT_PRECISION)
        p_xb += BLOCK_K * stride_xk
    return b_acc, b_acc_up
