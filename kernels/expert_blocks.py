"""The expert-grouped slot layout the fused expert kernels read (``ExpertBlocks``), built on the device.

Every token slot (slot = token * K + k) goes to its expert's run of rows, each run padded to the
GEMM's ``block_m`` so that a row block holds one expert. Two builds give the same layout:

- decode-sized inputs (at most ``ONE_LAUNCH_SLOTS`` slots) take one single-program launch that
  counts, lays out the runs, labels the row blocks and places the slots in slot order inside each
  run; at decode, launches rather than work set the time, eager and in CUDA graphs alike;
- larger inputs take three grid launches (count, runs, place) after two fills, with slots placed
  inside a run by atomics: an order the results do not depend on (rows are independent).

A single token needs no layout at all (``DecodeSlots``): its K slots have K distinct experts, and
the GEMMs read the ids directly.

Out-of-range ids are dropped (expert parallelism sends every rank ids outside its experts).
Nothing syncs the host: the arrays have static worst-case sizes.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import dependent_launch, wait_for_prior_kernel
from kernels.tiles import cdiv, next_power_of_2

# slots up to which one program builds the layout: its [slots, RANK_CHUNK] rank comparisons stay
# a few registers a thread, and 256 slots cover decode (Qwen3-MoE's K=8 up to 32 tokens)
ONE_LAUNCH_SLOTS = 256
RANK_CHUNK = 32
FILL_BLOCK = 1024
SLOTS_PER_PROGRAM = 512  # the grid build's count and place launches


@dataclass(slots=True)  # not frozen: built on every call, and a frozen dataclass builds slower
class ExpertBlocks:
    """Token slots grouped by expert, each expert's run padded to ``block_m``.

    ``sorted_slots[r]`` is the slot in padded row r (``n_slots`` marks padding); ``block_experts[b]``
    is the expert of rows [b * block_m, (b + 1) * block_m) (``E`` past ``num_padded``); the arrays
    have static worst-case sizes so nothing depends on the data on the host."""
    sorted_slots: torch.Tensor  # [n_slots + E * (block_m - 1)] int32
    block_experts: torch.Tensor  # [cdiv(len(sorted_slots), block_m)] int32
    num_padded: torch.Tensor  # [1] int32: rows in use
    expert_counts: torch.Tensor  # [E] int32: slots routed to each expert
    block_m: int
    n_slots: int


@dataclass(slots=True)
class DecodeSlots:
    """No layout, for a single token's slots (K distinct experts): the GEMMs run one program per
    (slot, column block) over the flat ids and each slot's program finds its expert's slots itself
    (``kernels.fused_experts``), so no layout launch precedes them. With several tokens, slots
    sharing an expert would leave programs idle, hence ``decode_slots_fit``."""
    slot_experts: torch.Tensor  # [n_slots] the flat ids, unit stride
    num_experts: int
    block_m: int
    n_slots: int


def decode_slots_fit(n_tokens: int, n_slots: int, block_m: int) -> bool:
    """Whether a call takes ``DecodeSlots``: one token, whose slots fit one row block."""
    return n_tokens == 1 and n_slots <= block_m


@triton.jit
def _runs(b_counts, o_e, m_e, p_starts, p_block_experts, p_num_padded, n_blocks,
          BLOCK_M: tl.constexpr, LABEL_BLOCK: tl.constexpr):
    """From the [BINS] counts of bins ``o_e`` (experts where ``m_e``): each expert's first padded
    row, the rows in use, and every row block's expert."""
    b_padded = tl.cdiv(b_counts, BLOCK_M) * BLOCK_M
    b_end = tl.cumsum(b_padded, 0)
    tl.store(p_starts + o_e, b_end - b_padded, mask=m_e)
    tl.store(p_num_padded, tl.sum(b_padded, 0))
    # expert of block b = how many experts' padded runs end at or before its first row; small
    # [LABEL_BLOCK, BINS] chunks keep the comparison in registers (a 512 x 128 block spills them)
    for b0 in range(0, n_blocks, LABEL_BLOCK):
        o_b = b0 + tl.arange(0, LABEL_BLOCK)
        m_ended = (b_end[None, :] <= (o_b * BLOCK_M)[:, None]) & m_e[None, :]
        tl.store(p_block_experts + o_b, tl.sum(m_ended.to(tl.int32), 1), mask=o_b < n_blocks)


@triton.jit
def _expert_ids(p_ids, o_s, n_slots, E):
    """The slots' ids, with out-of-range ids (and slots past n_slots) in the spare bin E; and which are in range."""
    b_ids = tl.load(p_ids + o_s, mask=o_s < n_slots, other=0)
    m_s = (o_s < n_slots) & (b_ids >= 0) & (b_ids < E)
    return tl.where(m_s, b_ids, E).to(tl.int32), m_s


@triton.jit
def _one_launch_kernel(
    p_ids, p_counts, p_starts, p_sorted, p_block_experts, p_num_padded, n_slots, E, n_rows, n_blocks,
    BLOCK_S: tl.constexpr, BINS: tl.constexpr, BLOCK_M: tl.constexpr, LABEL_BLOCK: tl.constexpr,
    RANK_CHUNK: tl.constexpr, FILL_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One program builds the whole layout for n_slots <= BLOCK_S; slots keep their order in a run."""
    wait_for_prior_kernel(PDL)
    o_s = tl.arange(0, BLOCK_S)
    b_ids, m_s = _expert_ids(p_ids, o_s, n_slots, E)  # [BS]
    o_e = tl.arange(0, BINS)
    m_e = o_e < E
    b_counts = tl.where(m_e, tl.histogram(b_ids, BINS), 0)  # [BINS]
    tl.store(p_counts + o_e, b_counts, mask=m_e)
    _runs(b_counts, o_e, m_e, p_starts, p_block_experts, p_num_padded, n_blocks, BLOCK_M, LABEL_BLOCK)
    for r0 in range(0, n_rows, FILL_BLOCK):  # every row padding first
        o_r = r0 + tl.arange(0, FILL_BLOCK)
        tl.store(p_sorted + o_r, tl.zeros([FILL_BLOCK], tl.int32) + n_slots, mask=o_r < n_rows)
    # a slot's place in its run: the earlier slots of its expert, [BS, RANK_CHUNK] at a time
    b_rank = tl.zeros([BLOCK_S], tl.int32)
    for j0 in range(0, n_slots, RANK_CHUNK):
        o_j = j0 + tl.arange(0, RANK_CHUNK)
        b_ids_j, _ = _expert_ids(p_ids, o_j, n_slots, E)
        m_before = (b_ids_j[None, :] == b_ids[:, None]) & (o_j[None, :] < o_s[:, None])
        b_rank += tl.sum(m_before.to(tl.int32), 1)
    tl.debug_barrier()  # the starts and the padding are in memory before any thread reads or overwrites them
    b_first = tl.load(p_starts + b_ids, mask=m_s, other=0)
    tl.store(p_sorted + b_first + b_rank, o_s, mask=m_s)


@triton.jit
def _count_experts_kernel(p_ids, p_counts, n_slots, E, BLOCK: tl.constexpr, BINS: tl.constexpr):
    o_s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_ids, _ = _expert_ids(p_ids, o_s, n_slots, E)
    b_hist = tl.histogram(b_ids, BINS)
    o_bins = tl.arange(0, BINS)
    tl.atomic_add(p_counts + o_bins, b_hist, mask=(o_bins < E) & (b_hist > 0))


@triton.jit
def _expert_runs_kernel(p_counts, p_starts, p_block_experts, p_num_padded, E, n_blocks,
                        BINS: tl.constexpr, BLOCK_M: tl.constexpr, LABEL_BLOCK: tl.constexpr):
    o_e = tl.arange(0, BINS)
    m_e = o_e < E
    b_counts = tl.load(p_counts + o_e, mask=m_e, other=0)
    _runs(b_counts, o_e, m_e, p_starts, p_block_experts, p_num_padded, n_blocks, BLOCK_M, LABEL_BLOCK)


@triton.jit
def _scatter_slots_kernel(p_ids, p_starts, p_cursor, p_sorted, n_slots, E, BLOCK: tl.constexpr):
    """Place every slot in its expert's padded run."""
    o_s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_ids, m_s = _expert_ids(p_ids, o_s, n_slots, E)
    b_rank = tl.atomic_add(p_cursor + b_ids, 1, mask=m_s)
    b_first = tl.load(p_starts + b_ids, mask=m_s, other=0)
    tl.store(p_sorted + b_first + b_rank, o_s, mask=m_s)


def group_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Build the ``ExpertBlocks`` layout for ``topk_ids`` [T, K] (any integer dtype; ids outside
    [0, E) are dropped). No host sync."""
    n_slots = topk_ids.numel()
    device = topk_ids.device
    n_rows = n_slots + num_experts * (block_m - 1)
    n_blocks = cdiv(n_rows, block_m)
    block_experts = torch.empty((n_blocks,), dtype=torch.int32, device=device)
    num_padded = torch.empty((1,), dtype=torch.int32, device=device)
    ids = topk_ids.contiguous().view(-1)  # the kernels index it with unit stride
    bins = next_power_of_2(num_experts + 1)  # the experts and a spare bin for dropped ids
    label_block = max(16, 4096 // bins)
    if n_slots <= ONE_LAUNCH_SLOTS:
        counts, starts = torch.empty((2, num_experts), dtype=torch.int32, device=device)
        sorted_slots = torch.empty((n_rows,), dtype=torch.int32, device=device)
        pdl = dependent_launch(device)
        _one_launch_kernel[(1,)](ids, counts, starts, sorted_slots, block_experts, num_padded, n_slots, num_experts,
                                 n_rows, n_blocks, BLOCK_S=next_power_of_2(max(n_slots, 1)), BINS=bins,
                                 BLOCK_M=block_m, LABEL_BLOCK=label_block, RANK_CHUNK=RANK_CHUNK,
                                 FILL_BLOCK=FILL_BLOCK, PDL=pdl, launch_pdl=pdl)
        return ExpertBlocks(sorted_slots, block_experts, num_padded, counts, block_m, n_slots)
    counts, cursor, starts = torch.zeros((3, num_experts), dtype=torch.int32, device=device)
    sorted_slots = torch.full((n_rows,), n_slots, dtype=torch.int32, device=device)
    grid = (cdiv(n_slots, SLOTS_PER_PROGRAM),)
    _count_experts_kernel[grid](ids, counts, n_slots, num_experts, BLOCK=SLOTS_PER_PROGRAM, BINS=bins)
    _expert_runs_kernel[(1,)](counts, starts, block_experts, num_padded, num_experts, n_blocks,
                              BINS=bins, BLOCK_M=block_m, LABEL_BLOCK=label_block)
    _scatter_slots_kernel[grid](ids, starts, cursor, sorted_slots, n_slots, num_experts, BLOCK=SLOTS_PER_PROGRAM)
    return ExpertBlocks(sorted_slots, block_experts, num_padded, counts, block_m, n_slots)


def group_by_expert_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """``group_by_expert`` in torch, slots in slot order inside each run (the one-launch build's order)."""
    ids = topk_ids.reshape(-1).long()
    n_slots, device = ids.numel(), ids.device
    kept = (ids >= 0) & (ids < num_experts)
    experts, order = torch.sort(ids[kept], stable=True)
    slots = torch.arange(n_slots, device=device)[kept][order]
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    n_rows = n_slots + num_experts * (block_m - 1)
    rank = torch.arange(slots.numel(), device=device) - (counts.cumsum(0) - counts)[experts]
    sorted_slots = torch.full((n_rows,), n_slots, dtype=torch.int32, device=device)
    sorted_slots[(ends - padded)[experts] + rank] = slots.int()
    first_rows = torch.arange(cdiv(n_rows, block_m), device=device) * block_m
    block_experts = torch.bucketize(first_rows, ends, right=True)  # runs ending at or before the block: its expert
    return ExpertBlocks(sorted_slots, block_experts.int(), ends[-1:].int(), counts.int(), block_m, n_slots)
