"""Decode attention over a static KV cache: one query per sequence, the cache's length on the device.

``decode_attention(q, k_cache, v_cache, kv_lengths)`` attends each sequence's single query to the
first ``kv_lengths[b]`` positions of its cache. The caches are pre-allocated [B, H_kv, capacity, D]
and ``kv_lengths`` is an int32 device tensor, so a decode step reads no length on the host and can
be captured once in a CUDA graph and replayed as the cache fills. Grouped-query attention maps
query head h to KV head h // (H_q / H_kv). Softmax is online, in fp32, in the exp2 domain.
"""
import math

import torch
import triton
import triton.language as tl

from kernels._autograd import apply_with_reference_grad
from kernels.validate import INDEX_DTYPES, check_dim, check_same_dtype_device, check_sm_scale, check_tensor

HEAD_DIMS = (32, 64, 128)
LOG2_E = 1.4426950408889634
BLOCK_N = 64


@triton.jit
def _decode_attention_kernel(
    p_q, p_k, p_v, p_o, p_lengths, stride_len, qk_scale_log2, HEADS_Q, GQA_GROUP, CAPACITY,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: the query of one (batch, head) against its cache's first kv_lengths[b] rows."""
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // HEADS_Q).to(tl.int64), (i_bh % HEADS_Q).to(tl.int64)  # a cache can pass 2**31 elements
    i_hkv = i_h // GQA_GROUP
    o_d = tl.arange(0, HEAD_DIM)
    o_n = tl.arange(0, BLOCK_N)
    n_kv = tl.minimum(tl.load(p_lengths + i_b * stride_len), CAPACITY)  # stride 0: one shared length

    b_q = tl.load(p_q + i_b * stride_qb + i_h * stride_qh + o_d).to(tl.float32) * qk_scale_log2  # [D]
    b_m = tl.full((1,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((1,), dtype=tl.float32)
    b_acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    p_kh = p_k + i_b * stride_kb + i_hkv * stride_kh
    p_vh = p_v + i_b * stride_vb + i_hkv * stride_vh
    for n0 in range(0, n_kv, BLOCK_N):
        m_n = (n0 + o_n) < n_kv
        o_rows = (n0 + o_n).to(tl.int64)[:, None]
        b_k = tl.load(p_kh + o_rows * stride_ks + o_d[None, :], mask=m_n[:, None], other=0.0)  # [BN, D]
        b_s = tl.sum(b_k.to(tl.float32) * b_q[None, :], 1)  # [BN]
        b_s = tl.where(m_n, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
        b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # all -inf so far: weights 0, not NaN
        b_p = tl.math.exp2(b_s - b_base)  # [BN]
        b_alpha = tl.math.exp2(b_m - b_base)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_v = tl.load(p_vh + o_rows * stride_vs + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v.to(tl.float32), 0)  # [D]
        b_m = b_m_new
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)  # an empty cache (length 0) gives zeros, not NaN
    tl.store(p_o + i_b * stride_ob + i_h * stride_oh + o_d, b_o.to(p_o.dtype.element_ty))


def _check(q, k_cache, v_cache, kv_lengths):
    check_tensor("q", q, ndim=4)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per sequence, [B, H, 1, D], got shape {tuple(q.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q has head dim {q.shape[-1]}; supported head dims are {HEAD_DIMS}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last (head) dim, got strides {q.stride()}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, ndim=4)
        check_same_dtype_device(q=q, **{name: cache})
        check_dim(name, cache, 0, q.shape[0], "the batch size of q")
        check_dim(name, cache, 3, q.shape[3], "the head dim of q")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {cache.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; expected k_cache's {tuple(k_cache.shape)}")
    if k_cache.shape[1] == 0 or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"k_cache has {k_cache.shape[1]} heads, which must divide the {q.shape[1]} heads of q "
                         "(grouped-query attention)")
    check_tensor("kv_lengths", kv_lengths, ndim=1, dtypes=INDEX_DTYPES)
    if kv_lengths.device != q.device:
        raise ValueError(f"kv_lengths is on {kv_lengths.device} but q is on {q.device}")
    if kv_lengths.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"kv_lengths must have 1 or B = {q.shape[0]} entries, got {kv_lengths.shape[0]}")


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                               sm_scale: float | None = None) -> torch.Tensor:
    """The same in torch: full-capacity scores, positions at or past each length masked out."""
    B, H, _, D = q.shape
    group = H // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(group, dim=1)  # [B, H, C, D]
    v = v_cache.float().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, 1, C]
    lengths = kv_lengths.long().expand(B).clamp(max=k_cache.shape[2])
    visible = torch.arange(k_cache.shape[2], device=q.device)[None, :] < lengths[:, None]  # [B, C]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    empty = (lengths <= 0)[:, None, None, None]
    probs = torch.where(empty, 0.0, scores.softmax(-1))  # an empty cache: zeros (other NaN stays NaN)
    return (probs @ v).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor,
                     sm_scale: float | None = None) -> torch.Tensor:
    """Attention of one query per sequence to its static cache, with no host sync.

    Args:
        q: [B, H_q, 1, D] float32/float16/bfloat16, D in 32/64/128, contiguous in D.
        k_cache, v_cache: [B, H_kv, capacity, D], same dtype and device; H_kv divides H_q.
        kv_lengths: int32/int64 [B] (or [1], shared) on q's device: positions of each cache to read
            (clamped to the capacity; a length <= 0 reads nothing). Not checked on the host (that
            would sync).
        sm_scale: the score scale; default 1 / sqrt(D).
    Returns:
        [B, H_q, 1, D] in q's dtype; a sequence whose length is <= 0 gets zeros. Gradients, where
        inputs need them, come from the torch reference.
    """
    _check(q, k_cache, v_cache, kv_lengths)
    scale = check_sm_scale(sm_scale, q.shape[-1])

    def kernel(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return launch_decode_attention(q_, k_, v_, kv_lengths, scale)

    def reference(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return decode_attention_reference(q_, k_, v_, kv_lengths, scale)

    return apply_with_reference_grad(kernel, reference, q, k_cache, v_cache)


def launch_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            kv_lengths: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, _, D = q.shape
    o = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    _decode_attention_kernel[(B * H,)](
        q, k_cache, v_cache, o, kv_lengths, kv_lengths.stride(0) if kv_lengths.shape[0] > 1 else 0, scale * LOG2_E,
        H, H // k_cache.shape[1], k_cache.shape[2],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        HEAD_DIM=D, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return o
