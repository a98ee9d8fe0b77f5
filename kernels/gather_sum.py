"""Sum of gathered rows: ``out[t] = sum_j rows[index[t, j]]`` over the entries with ``index >= 0``.

The fused experts use it to add each token's K per-slot outputs (a slot whose expert id is out of
range contributes nothing, and its never-written row is never read), and expert parallelism to
add the partial outputs that a token's owning ranks sent back. Masked loads read only the rows
used, the sum runs in j order in float32 (deterministic), and the result is rounded once.
"""
import torch
import triton
import triton.language as tl

from kernels._library import kernel_op
from kernels.dependent_launch import dependent_launch, wait_for_prior_kernel
from kernels.tiles import cdiv, next_power_of_2
from kernels.validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor


@triton.jit
def _gather_sum_kernel(p_rows, p_index, p_out, T, H, E, stride_row, stride_out,
                       J: tl.constexpr, SLOTS_OF_IDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                       PDL: tl.constexpr):
    """With SLOTS_OF_IDS, ``p_index`` holds expert ids [T, J] and entry (t, j) reads row t*J + j
    when its id is in [0, E) (the fused experts' per-slot rows); else it holds the row numbers."""
    wait_for_prior_kernel(PDL)
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_t, m_h = o_t < T, o_h < H
    b_acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(J):
        b_row = tl.load(p_index + o_t.to(tl.int64) * J + j, mask=m_t, other=-1).to(tl.int64)  # [BT]
        if SLOTS_OF_IDS:
            b_row = tl.where((b_row >= 0) & (b_row < E), o_t.to(tl.int64) * J + j, -1)
        m_used = (b_row >= 0)[:, None] & m_h[None, :]
        p_rows_j = p_rows + tl.maximum(b_row, 0)[:, None] * stride_row + o_h[None, :]
        b_acc += tl.load(p_rows_j, mask=m_used, other=0.0).to(tl.float32)
    tl.store(p_out + o_t.to(tl.int64)[:, None] * stride_out + o_h[None, :], b_acc.to(p_out.dtype.element_ty),
             mask=m_t[:, None] & m_h[None, :])


def launch_gather_sum(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor = None,
                      num_experts: int = None) -> torch.Tensor:
    """``gather_sum`` on validated inputs; ``out`` [T, H] may be given. No host sync.

    With ``num_experts``, ``index`` is the [T, K] expert ids of per-slot rows [T*K, H] instead:
    slot (t, k) counts when its id is in [0, num_experts)."""
    T, J = index.shape
    H = rows.shape[1]
    if out is None:
        out = torch.empty((T, H), dtype=rows.dtype, device=rows.device)
    if T == 0 or H == 0:
        return out
    if J == 0:
        return out.zero_()
    block_h = min(256, next_power_of_2(H))
    block_t = max(1, 2048 // block_h)
    grid = (cdiv(T, block_t), cdiv(H, block_h))
    pdl = dependent_launch(rows.device)
    _gather_sum_kernel[grid](rows, index.contiguous(), out, T, H, num_experts or 0, rows.stride(0), out.stride(0),
                             J=J, SLOTS_OF_IDS=num_experts is not None, BLOCK_T=block_t, BLOCK_H=block_h,
                             PDL=pdl, launch_pdl=pdl)
    return out


def gather_sum(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Args:
        rows: [N, H] float32/float16/bfloat16, unit stride along H.
        index: [T, J] int32/int64 row numbers; -1 (any negative) skips the entry. Entries >= N
            are an error (checked here with one host sync; ``launch_gather_sum`` skips the check).
    Returns:
        [T, H] in ``rows``' dtype: the float32 sum of each token's rows, rounded once; gradients to
        ``rows``, where it needs them, come from the torch reference."""
    check_tensor("rows", rows, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES)
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        raise ValueError(f"rows must have unit stride along dim 1, got strides {rows.stride()}")
    if index.device != rows.device:
        raise ValueError(f"index is on {index.device} but rows is on {rows.device}")
    if index.numel() and index.max() >= rows.shape[0]:
        raise ValueError(f"index has entries >= {rows.shape[0]} (the rows of rows)")
    return _gather_sum_op(rows, index)


def gather_sum_reference(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather_sum`` in torch (float32 accumulation)."""
    padded = torch.cat((rows.float(), rows.new_zeros(1, rows.shape[1], dtype=torch.float32)))  # row N: zeros
    return padded[torch.where(index >= 0, index, rows.shape[0]).long()].sum(1).to(rows.dtype)


def _gather_sum_fake(rows, index):
    return rows.new_empty((index.shape[0], rows.shape[1]))


_gather_sum_op = kernel_op("gather_sum", "(Tensor rows, Tensor index) -> Tensor", launch_gather_sum,
                           fake=_gather_sum_fake, reference=gather_sum_reference)
