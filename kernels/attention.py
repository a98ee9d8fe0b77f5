"""Attention: a FlashAttention-style forward, and standalone QKᵀ and softmax·V kernels.

``flash_attention`` follows ``torch.nn.functional.scaled_dot_product_attention``: tensors are
[B, H, S, D], ``causal`` masks key j for query i when j > i (top-left aligned, as SDPA's
``is_causal``), and grouped-query attention maps query head h to KV head h // (H_q / H_kv), as
SDPA's ``enable_gqa``. Softmax is online, in fp32, in the exp2 domain. ``attention_qk`` and
``attention_av`` split the same computation at the score matrix so the cost model can
calibrate the two ops separately; together they equal ``flash_attention``.
"""
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import config as _config
from kernels._autograd import apply_with_reference_grad
from kernels._library import kernel_op
from kernels.tiles import cdiv
from kernels.validate import (check_bool, check_dim, check_same_dtype_device, check_sm_scale, check_tensor,
                               dot_precision, tma_compatible)

HEAD_DIMS = (32, 64, 128)
LOG2_E = 1.4426950408889634


@triton.jit
def _online_softmax_step(b_acc, b_l, b_m, b_s, b_v, scale_log2, DOT_PRECISION: tl.constexpr,
                         FOLD_SCALE: tl.constexpr):
    """Fold a [BM, BN] block of log2-domain scores and its [BN, D] values into the running state.

    FOLD_SCALE: ``b_s`` is raw and unmasked, and ``scale_log2`` > 0 (so the row max commutes with it):
    the scale rides in the exp2 argument, one FMA an element (2-4% faster on an H100). Else ``b_s``
    is already scaled, and may be masked."""
    if FOLD_SCALE:
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
        b_p = tl.math.exp2(b_s * scale_log2 - b_m_new[:, None])
        b_base = b_m_new
    else:
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # a row masked so far: exp2(-inf - 0) = 0
        b_p = tl.math.exp2(b_s - b_base[:, None])
    b_alpha = tl.math.exp2(b_m - b_base)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def _mask_scores(b_s, o_m, o_n, S_KV, CAUSAL: tl.constexpr):
    m_valid = o_n[None, :] < S_KV
    if CAUSAL:
        m_valid = m_valid & (o_n[None, :] <= o_m[:, None])
    return tl.where(m_valid, b_s, float("-inf"))


@triton.jit
def _kv_ranges(i_m, S_KV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """[0, n_full) needs no mask; [n_full, n_end) needs the tail and/or causal mask."""
    if CAUSAL:
        n_end = tl.minimum((i_m + 1) * BLOCK_M, S_KV)
        n_full = (tl.minimum(i_m * BLOCK_M, S_KV) // BLOCK_N) * BLOCK_N
    else:
        n_end = S_KV
        n_full = (S_KV // BLOCK_N) * BLOCK_N
    return n_full, n_end


@triton.jit
def _load_rows(src, i_b, i_h, row0, n_rows, stride_b, stride_h, stride_s,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows [row0, row0 + BLOCK) of head (i_b, i_h) as [BLOCK, D]; rows >= n_rows read as 0.

    ``src`` is a [B, H, S, D] tensor descriptor (whose bounds zero-fill) or a pointer."""
    if USE_TMA:
        b_rows = src.load([i_b, i_h, row0, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        o_r = row0 + tl.arange(0, BLOCK)
        p_rows = (src + i_b.to(tl.int64) * stride_b + i_h.to(tl.int64) * stride_h
                  + o_r.to(tl.int64)[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :])
        if MASK_ROWS:
            b_rows = tl.load(p_rows, mask=o_r[:, None] < n_rows, other=0.0)
        else:
            b_rows = tl.load(p_rows)
    return b_rows


@triton.jit
def _flash_attention_kernel(
    src_q, src_k, src_v, dst_o, qk_scale_log2,
    S_Q, S_KV, HEADS_Q, GQA_GROUP,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head). src_*/dst_o are descriptors if USE_TMA, else pointers."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HEADS_Q, i_bh % HEADS_Q
    i_hkv = i_h // GQA_GROUP
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)

    b_q = _load_rows(src_q, i_b, i_h, m0, S_Q, stride_qb, stride_qh, stride_qs,
                     BLOCK_M, HEAD_DIM, USE_TMA, True)  # [BM, D]
    b_m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    n_full, n_end = _kv_ranges(i_m, S_KV, BLOCK_M, BLOCK_N, CAUSAL)
    for n0 in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        b_k = _load_rows(src_k, i_b, i_hkv, n0, S_KV, stride_kb, stride_kh, stride_ks,
                         BLOCK_N, HEAD_DIM, USE_TMA, False)  # [BN, D]
        b_s = tl.dot(b_q, b_k.T, input_precision=DOT_PRECISION)  # [BM, BN]
        if not POSITIVE_SCALE:
            b_s = b_s * qk_scale_log2
        b_v = _load_rows(src_v, i_b, i_hkv, n0, S_KV, stride_vb, stride_vh, stride_vs,
                         BLOCK_N, HEAD_DIM, USE_TMA, False)  # [BN, D]
        b_acc, b_l, b_m = _online_softmax_step(b_acc, b_l, b_m, b_s, b_v, qk_scale_log2, DOT_PRECISION,
                                               POSITIVE_SCALE)
    for n0 in range(n_full, n_end, BLOCK_N):
        b_k = _load_rows(src_k, i_b, i_hkv, n0, S_KV, stride_kb, stride_kh, stride_ks,
                         BLOCK_N, HEAD_DIM, USE_TMA, True)
        b_s = tl.dot(b_q, b_k.T, input_precision=DOT_PRECISION) * qk_scale_log2
        b_s = _mask_scores(b_s, o_m, n0 + o_n, S_KV, CAUSAL)
        b_v = _load_rows(src_v, i_b, i_hkv, n0, S_KV, stride_vb, stride_vh, stride_vs,
                         BLOCK_N, HEAD_DIM, USE_TMA, True)
        b_acc, b_l, b_m = _online_softmax_step(b_acc, b_l, b_m, b_s, b_v, qk_scale_log2, DOT_PRECISION, False)

    b_o = b_acc / b_l[:, None]
    if USE_TMA:
        dst_o.store([i_b, i_h, m0, 0], b_o.to(dst_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        p_ob = (dst_o + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
                + o_m.to(tl.int64)[:, None] * stride_os + tl.arange(0, HEAD_DIM)[None, :])
        tl.store(p_ob, b_o.to(dst_o.dtype.element_ty), mask=o_m[:, None] < S_Q)


@triton.jit
def _attention_qk_kernel(
    p_q, p_k, p_s, qk_scale,
    S_Q, S_KV, HEADS_Q, GQA_GROUP,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_sb, stride_sh, stride_sm,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_mn, i_bh = tl.program_id(0), tl.program_id(1)
    n_tiles_n = tl.cdiv(S_KV, BLOCK_N)
    i_m, i_n = i_mn // n_tiles_n, i_mn % n_tiles_n
    # 64-bit offsets: [B, H, S, S] scores pass 2**31 elements (B16 H12 S4096) long before q or k do
    i_b, i_h = (i_bh // HEADS_Q).to(tl.int64), (i_bh % HEADS_Q).to(tl.int64)
    i_hkv = i_h // GQA_GROUP
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m, m_n = o_m < S_Q, o_n < S_KV

    b_q = tl.load(p_q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :],
                  mask=m_m[:, None], other=0.0)  # [BM, D]
    b_k = tl.load(p_k + i_b * stride_kb + i_hkv * stride_kh + o_n[None, :] * stride_ks + o_d[:, None],
                  mask=m_n[None, :], other=0.0)  # [D, BN]
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * qk_scale
    p_sb = p_s + i_b * stride_sb + i_h * stride_sh + o_m[:, None] * stride_sm + o_n[None, :]
    tl.store(p_sb, b_s.to(p_s.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _attention_av_kernel(
    p_s, p_v, p_o,
    S_Q, S_KV, HEADS_Q, GQA_GROUP,
    stride_sb, stride_sh, stride_sm, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // HEADS_Q).to(tl.int64), (i_bh % HEADS_Q).to(tl.int64)  # 64-bit offsets, as in qk
    i_hkv = i_h // GQA_GROUP
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    m_m = o_m < S_Q

    p_sb = p_s + i_b * stride_sb + i_h * stride_sh + o_m.to(tl.int64)[:, None] * stride_sm + o_n[None, :]  # [BM, BN]
    p_vb = p_v + i_b * stride_vb + i_hkv * stride_vh + o_n[:, None] * stride_vs + o_d[None, :]  # [BN, D]
    b_m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    _, n_end = _kv_ranges(i_m, S_KV, BLOCK_M, BLOCK_N, CAUSAL)
    for n0 in range(0, n_end, BLOCK_N):
        m_n = (n0 + o_n) < S_KV
        b_s = tl.load(p_sb + n0, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_s = b_s * 1.4426950408889634  # log2(e): the softmax runs in the exp2 domain
        b_s = _mask_scores(b_s, o_m, n0 + o_n, S_KV, CAUSAL)
        b_v = tl.load(p_vb + n0 * stride_vs, mask=m_n[:, None], other=0.0)
        b_acc, b_l, b_m = _online_softmax_step(b_acc, b_l, b_m, b_s, b_v, 1.0, DOT_PRECISION, False)

    b_o = b_acc / b_l[:, None]
    p_ob = p_o + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_os + o_d[None, :]
    tl.store(p_ob, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None])


def _check_head_dim(name, t):
    if t.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name} has head dim {t.shape[-1]}; supported head dims are {HEAD_DIMS}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")


def _check_kv(q_name, q, kv_name, kv, same_head_dim=True):
    """``kv`` [B, H_kv, S_kv, D] must match ``q`` [B, H_q, *, D] with H_q a multiple of H_kv
    (``same_head_dim=False`` for scores, whose last dim is S_kv)."""
    check_tensor(kv_name, kv, ndim=4)
    check_same_dtype_device(**{q_name: q, kv_name: kv})
    check_dim(kv_name, kv, 0, q.shape[0], f"the batch size of {q_name}")
    if same_head_dim:
        check_dim(kv_name, kv, 3, q.shape[3], f"the head dim of {q_name}")
    _check_head_dim(kv_name, kv)
    if kv.shape[1] == 0 or q.shape[1] % kv.shape[1]:
        raise ValueError(f"{kv_name} has {kv.shape[1]} heads, which must divide the {q.shape[1]} heads of "
                         f"{q_name} (grouped-query attention)")


def _check_q(q):
    check_tensor("q", q, ndim=4)
    _check_head_dim("q", q)


def _launch_config(q):
    return _config.lookup("attention", q.device, head_dim=q.shape[-1], elem_bytes=q.element_size())


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def launch_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
                           cfg: dict | None = None) -> torch.Tensor:
    B, H, S_Q, D = q.shape
    H_KV, S_KV = k.shape[1], k.shape[2]
    strides = (*_strides(q), *_strides(k), *_strides(v))
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if o.numel() == 0:
        return o
    cfg = cfg or _launch_config(q)
    bm, bn = cfg["block_m"], cfg["block_n"]
    use_tma = bool(cfg.get("tma")) and tma_compatible(q, k, v, o)
    if use_tma:  # block shapes [1, 1, rows, D]: out-of-range rows stay inside one (batch, head)
        q, o_dst = TensorDescriptor.from_tensor(q, [1, 1, bm, D]), TensorDescriptor.from_tensor(o, [1, 1, bm, D])
        k, v = TensorDescriptor.from_tensor(k, [1, 1, bn, D]), TensorDescriptor.from_tensor(v, [1, 1, bn, D])
    grid = (cdiv(S_Q, bm), B * H)
    _flash_attention_kernel[grid](
        q, k, v, o_dst if use_tma else o, sm_scale * LOG2_E, S_Q, S_KV, H, H // H_KV,
        *strides, *_strides(o),
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DOT_PRECISION=dot_precision(o.dtype), USE_TMA=use_tma,
        WARP_SPECIALIZE=bool(cfg.get("warp_specialize")), POSITIVE_SCALE=sm_scale > 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              sm_scale: float | None = None) -> torch.Tensor:
    """Attention in torch, materialising the scores (same semantics as ``flash_attention``)."""
    scores = attention_qk_reference(q, k, sm_scale)
    return attention_av_reference(scores, v, causal)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None) -> torch.Tensor:
    """FlashAttention forward with the semantics of SDPA (``is_causal=causal``, ``scale=sm_scale``).

    Args:
        q: [B, H_q, S_q, D], D in (32, 64, 128), float32/float16/bfloat16.
        k, v: [B, H_kv, S_kv, D] with H_q a multiple of H_kv (grouped-query attention), S_kv >= 1.
        causal: mask keys after each query position (top-left aligned).
        sm_scale: score scale; ``None`` means 1/sqrt(D).
    Returns:
        [B, H_q, S_q, D] in ``q``'s dtype.
    """
    _check_q(q)
    _check_kv("q", q, "k", k)
    _check_kv("q", q, "v", v)
    check_dim("v", v, 2, k.shape[2], "the sequence length of k")
    check_dim("v", v, 1, k.shape[1], "the heads of k")
    causal = check_bool("causal", causal)
    sm_scale = check_sm_scale(sm_scale, q.shape[-1])
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("k and v have sequence length 0; each query needs at least one key")
    return _flash_attention_op(q, k, v, causal, sm_scale)


_flash_attention_op = kernel_op(
    "flash_attention", "(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale) -> Tensor",
    launch_flash_attention,
    fake=lambda q, k, v, causal, sm_scale: torch.empty_like(q), reference=flash_attention_reference)


def attention_qk_reference(q: torch.Tensor, k: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Scaled scores ``q @ kᵀ * sm_scale`` in torch, with KV heads repeated for grouped queries."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-1, -2)) * scale


def attention_av_reference(scores: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``softmax(scores) @ v`` in torch, with the top-left causal mask if ``causal``."""
    if causal:
        s_q, s_kv = scores.shape[-2:]
        keep = torch.ones(s_q, s_kv, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    v = v.repeat_interleave(scores.shape[1] // v.shape[1], dim=1)
    return probs @ v


def attention_qk(q: torch.Tensor, k: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Scaled attention scores ``q @ kᵀ * sm_scale``, written to memory.

    Args:
        q: [B, H_q, S_q, D]; k: [B, H_kv, S_kv, D] with H_q a multiple of H_kv.
        sm_scale: ``None`` means 1/sqrt(D).
    Returns:
        [B, H_q, S_q, S_kv] in ``q``'s dtype.
    """
    _check_q(q)
    _check_kv("q", q, "k", k)
    sm_scale = check_sm_scale(sm_scale, q.shape[-1])

    def kernel(q_: torch.Tensor, k_: torch.Tensor) -> torch.Tensor:
        return launch_attention_qk(q_, k_, sm_scale)

    def reference(q_: torch.Tensor, k_: torch.Tensor) -> torch.Tensor:
        return attention_qk_reference(q_, k_, sm_scale)

    return apply_with_reference_grad(kernel, reference, q, k)


def launch_attention_qk(q: torch.Tensor, k: torch.Tensor, sm_scale: float | None) -> torch.Tensor:
    B, H, S_Q, D = q.shape
    S_KV = k.shape[2]
    scores = torch.empty((B, H, S_Q, S_KV), dtype=q.dtype, device=q.device)
    if scores.numel() == 0:
        return scores
    cfg = _launch_config(q)
    grid = (cdiv(S_Q, cfg["block_m"]) * cdiv(S_KV, cfg["block_n"]), B * H)
    _attention_qk_kernel[grid](
        q, k, scores, sm_scale, S_Q, S_KV, H, H // k.shape[1],
        *_strides(q), *_strides(k), *_strides(scores),
        HEAD_DIM=D, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return scores


def attention_av(scores: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``softmax(scores) @ v`` with an online fp32 softmax over the stored score matrix.

    Args:
        scores: [B, H_q, S_q, S_kv] (already scaled, e.g. from ``attention_qk``), contiguous.
        v: [B, H_kv, S_kv, D] with H_q a multiple of H_kv.
        causal: mask key j for query i when j > i (top-left aligned).
    Returns:
        [B, H_q, S_q, D] in ``scores``' dtype.
    """
    check_tensor("scores", scores, ndim=4)
    if scores.stride(-1) != 1:
        raise ValueError(f"scores must be contiguous in its last dim, got strides {scores.stride()}")
    _check_kv("scores", scores, "v", v, same_head_dim=False)
    check_dim("v", v, 2, scores.shape[-1], "the last dim (S_kv) of scores")
    causal = check_bool("causal", causal)
    if v.shape[2] == 0 and scores.shape[2] > 0:
        raise ValueError("scores and v have S_kv = 0; each query needs at least one key")

    def kernel(s_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return launch_attention_av(s_, v_, causal)

    def reference(s_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return attention_av_reference(s_, v_, causal)

    return apply_with_reference_grad(kernel, reference, scores, v)


def launch_attention_av(scores: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    B, H, S_Q, S_KV = scores.shape
    D = v.shape[-1]
    o = torch.empty((B, H, S_Q, D), dtype=scores.dtype, device=scores.device)
    if o.numel() == 0:
        return o
    cfg = _launch_config(v)
    grid = (cdiv(S_Q, cfg["block_m"]), B * H)
    _attention_av_kernel[grid](
        scores, v, o, S_Q, S_KV, H, H // v.shape[1],
        *_strides(scores), *_strides(v), *_strides(o),
        HEAD_DIM=D, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], CAUSAL=causal,
        DOT_PRECISION=dot_precision(v.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return o
