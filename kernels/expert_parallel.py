"""Expert parallelism over a torch.distributed process group: dispatch, local experts, combine.

Rank r of W owns experts [r*E/W, (r+1)*E/W). Every rank routes its own tokens with the full
router, then exchanges them in one of two ways.

Exact-size exchange (``capacity=None``):

1. plan (device ops, per chunk of tokens): the ranks each token needs (those owning one of its
   K experts), and a send order grouped by destination rank, tokens in order;
2. count exchange: one ``all_to_all_single`` of the [W, chunks] send counts, then one host sync
   to read the split sizes (NCCL's ``all_to_all_single`` takes them as Python lists: the only
   sync);
3. dispatch: each token's hidden row goes once to each rank it needs (not once per expert),
   packed with its K ids in the receiver's numbering (ids it does not own: out of range) and
   its K gate weights; all chunks are queued on NCCL's stream at once;
4. the receiver runs the fused experts on each chunk as it arrives; out-of-range ids are
   dropped, so each row comes back as the weighted sum over that rank's experts only, and the
   chunk's return is queued at once (so chunk c computes while c+1 arrives and c-1 returns);
5. combine: each token adds its ranks' rows in rank order (``kernels.gather_sum``:
   deterministic, float32).

Fixed-size exchange (``capacity=C``, the same on every rank, T <= C): no count exchange and no host
sync, so the layer can be captured in a CUDA graph (host launch time was most of the exact
exchange's cost on 2 and 4 H100s). Each rank's C token rows (its T tokens, then padding whose
ids are -1) go to every rank by one ``all_gather_into_tensor``, with the global ids and gate
weights packed in the same message; each receiver drops the ids it does not own, runs its
experts, and one ``reduce_scatter_tensor`` adds every rank's partial sums for each source's rows
and returns them (NCCL adds in the rows' dtype, in its ring order: fixed for a fixed setup).
From 4 ranks up each rank's own tokens skip the trip: their local experts run while the
collectives travel, and their sums are added last. Every token row goes to every rank: at top-8
over 4 ranks a token needs ~90% of the ranks anyway (1 - (3/4)^8), so this sends ~10% more than
the exact exchange; at many ranks per top-k the exact exchange sends less.

Both run the receiver's experts on persistent grids (``launch_fused_experts(persistent=True)``):
most received slots belong to other ranks' experts, and a grid sized for all of them idles.
In float32 the result equals the single-GPU layer's up to summation order; in bf16 the partial
sums are rounded once more (within bf16 tolerance), and in the fixed-size exchange once per
reduce-scatter step as well (measured: rel. L2 3.4e-3 against the single-GPU layer on 4 H100s,
2.6e-3 for the exact exchange). The layer is forward-only (no backward
through the all-to-all): with gradients enabled it raises rather than return a detached output.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kernels.fused_experts import expert_configs, launch_fused_experts
from kernels.gather_sum import launch_gather_sum

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# A rank's own tokens run apart (while the collectives travel) from 4 ranks up: apart, the local
# experts' weights are read three times instead of once, which on 2 GPUs costs more than the
# hidden transfers (measured: README, "Expert parallelism").
OWN_APART_MIN_RANKS = 4
# share of a chunk's own tokens computed during the dispatch (the rest during the return): the
# fastest of 0, 0.25, 0.5 and 1 on 4 H100s
OWN_SHARE_DURING_DISPATCH = 0.5


@dataclass(frozen=True)
class DispatchPlan:
    """Where each token goes. ``send_order`` [W*T]: (rank, token) entries flattened rank-major,
    those sent first, in send order; ``send_counts`` [W] int64 (device); ``combine_index`` [T, W]:
    each token's row in the returned buffer per rank, -1 where it was not sent; ``meta`` [W*T, 2K]
    int32: per (rank, token), the ids in that rank's numbering then the float32 weights' bits."""
    send_order: torch.Tensor
    send_counts: torch.Tensor
    combine_index: torch.Tensor
    meta: torch.Tensor


def plan_dispatch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts_per_rank: int,
                  world_size: int) -> DispatchPlan:
    """The ``DispatchPlan`` of a routed batch (device ops only, no host sync)."""
    T, K = topk_ids.shape
    device = topk_ids.device
    ids = topk_ids.long()
    owner = ids // experts_per_rank  # [T, K]
    needed = torch.zeros(T, world_size, dtype=torch.bool, device=device).scatter_(1, owner, True)  # [T, W]
    needed_rt = needed.T.reshape(-1)  # [W*T], rank-major
    send_order = torch.sort((~needed_rt).to(torch.int8), stable=True).indices  # sent entries first, in order
    position = needed_rt.long().cumsum(0) - 1  # each sent entry's row in the send buffer
    combine_index = torch.where(needed_rt, position, -1).view(world_size, T).T
    ranks = torch.arange(world_size, device=device)[:, None, None]
    local_ids = torch.where(owner[None] == ranks, ids[None] - ranks * experts_per_rank, experts_per_rank)
    weight_bits = topk_weights.float().contiguous().view(torch.int32)[None].expand(world_size, T, K)
    meta = torch.cat((local_ids.to(torch.int32), weight_bits), dim=2).view(world_size * T, 2 * K)
    return DispatchPlan(send_order, needed.sum(0), combine_index, meta)


def exchange_counts(send_counts: torch.Tensor, group: "ProcessGroup | None") -> tuple[list[list[int]], list[list[int]]]:
    """Receive counts for ``send_counts`` [W, C] (rows this rank sends to each rank in each chunk):
    (send splits, receive splits) as Python lists [C][W]; one all-to-all, one host sync."""
    world_size, chunks = send_counts.shape
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # rank r gets row r of every rank's
    counts = torch.stack((send_counts, recv_counts)).tolist()  # the sync the split sizes need
    return ([[counts[0][r][c] for r in range(world_size)] for c in range(chunks)],
            [[counts[1][r][c] for r in range(world_size)] for c in range(chunks)])


def _pack(hidden_states, plan, sent):
    """[S, H + M] rows to send: the hidden row, then its [2K] int32 ids and weights viewed in the
    rows' dtype (one message per chunk instead of two)."""
    meta = plan.meta[sent].view(hidden_states.dtype)
    return torch.cat((hidden_states[sent % max(hidden_states.shape[0], 1)], meta), dim=1)


def _unpack(received, hidden_size, top_k):
    meta = received[:, hidden_size:].contiguous().view(torch.int32)  # [R, 2K]
    return received[:, :hidden_size], meta[:, :top_k], meta[:, top_k:].view(torch.float32)


def receiver_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor, world_size: int) -> torch.Tensor:
    """The fused experts on the rows a rank received. Configs are picked for the expected load per
    local expert (the slots over all E = E/W * W experts: most slots are other ranks' and dropped)."""
    local_experts, two_i, _ = gate_up_proj.shape
    configs = None
    if hidden_states.shape[0] and two_i:
        configs = expert_configs(hidden_states, local_experts * world_size, two_i // 2, topk_ids.numel())
    return launch_fused_experts(hidden_states, gate_up_proj, down_proj, topk_ids, topk_weights, configs=configs,
                                persistent=True)


def expert_parallel_experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            gate_up_proj: torch.Tensor, down_proj: torch.Tensor, group: "ProcessGroup | None",
                            experts_fn: Callable[..., torch.Tensor] | None = None, chunks: int = 1,
                            capacity: int | None = None) -> torch.Tensor:
    """This rank's share of an expert-parallel MoE forward.

    Args:
        hidden_states: [T, H] this rank's tokens (float32/float16/bfloat16).
        topk_ids, topk_weights: [T, K] their global expert ids (in [0, E)) and gate weights.
        gate_up_proj, down_proj: this rank's experts, [E/W, 2I, H] and [E/W, H, I].
        group: the process group (W ranks, rank r owns experts [r*E/W, (r+1)*E/W)).
        experts_fn: runs the local experts, ``fn(x, gate_up, down, ids, weights)``; None: our
            kernels (``receiver_experts``); the torch reference ``fused_experts_reference`` for a
            check. It must drop ids outside [0, E/W).
        chunks: split the tokens into this many chunks, each dispatched while the previous one
            computes (NCCL runs the collectives on its own stream); the same on every rank. On 2
            and 4 H100s more chunks were slower, eager and in CUDA graphs.
        capacity: None (exact-size exchange: one count all-to-all and one host sync), or the
            tokens per rank of a fixed-size exchange (no host sync; T <= capacity; the same on
            every rank).
    Returns [T, H]. Every rank of the group must call it (with T = 0 if it has no tokens).
    """
    world_size = dist.get_world_size(group)
    if experts_fn is None:
        def experts_fn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
            return receiver_experts(x, gate_up, down, ids, weights, world_size)
    if capacity is not None:
        return _fixed_size_exchange(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, group,
                                    experts_fn, chunks, capacity)
    T, H = hidden_states.shape
    K = topk_ids.shape[1]
    bounds = [round(c * T / chunks) for c in range(chunks + 1)]
    pieces = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    plans = [plan_dispatch(topk_ids[p], topk_weights[p], gate_up_proj.shape[0], world_size) for p in pieces]
    send_splits, recv_splits = exchange_counts(torch.stack([plan.send_counts for plan in plans], dim=1), group)
    dispatches = []
    for piece, plan, sends, recvs in zip(pieces, plans, send_splits, recv_splits):
        packed = _pack(hidden_states[piece], plan, plan.send_order[:sum(sends)])
        received = packed.new_empty((sum(recvs), packed.shape[1]))
        dispatches.append((received, dist.all_to_all_single(received, packed, recvs, sends, group=group,
                                                             async_op=True)))
    returns = []
    for (received, work), sends, recvs in zip(dispatches, send_splits, recv_splits):
        work.wait()  # this stream waits for the chunk; the later chunks' dispatches keep going
        x_received, ids_received, weights_received = _unpack(received, H, K)
        partial = experts_fn(x_received, gate_up_proj, down_proj, ids_received, weights_received)  # [R, H]
        back = partial.new_empty((sum(sends), H))
        returns.append((back, dist.all_to_all_single(back, partial.contiguous(), sends, recvs, group=group,
                                                     async_op=True)))
    out = hidden_states.new_empty((T, H))
    for piece, plan, (back, work) in zip(pieces, plans, returns):
        work.wait()
        launch_gather_sum(back, plan.combine_index, out[piece])
    return out


def _fixed_size_exchange(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, group, experts_fn, chunks,
                         capacity):
    """``expert_parallel_experts`` with fixed-size messages (see the module docstring): no host sync.

    A rank's own tokens need no transfer, so from ``OWN_APART_MIN_RANKS`` ranks up their local
    experts run while the collectives travel: the first half while the chunk's rows arrive, the
    second while the partial sums of the other ranks' rows go back."""
    T, H = hidden_states.shape
    K = topk_ids.shape[1]
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    first_expert = rank * gate_up_proj.shape[0]
    bounds = sorted({round(c * capacity / chunks) for c in range(chunks + 1)})  # capacity rows, in chunks
    pieces = list(zip(bounds, bounds[1:]))
    gathers = []
    for first, end in pieces:
        packed = _pack_fixed(hidden_states, topk_ids, topk_weights, first, end)
        received = packed.new_empty((world_size * (end - first), packed.shape[1]))  # [W * rows, H + M]
        gathers.append((received, dist.all_gather_into_tensor(received, packed, group=group, async_op=True)))

    def own_experts(first: int, end: int) -> torch.Tensor:  # this rank's tokens [first, end) on its own experts
        tokens = slice(first, max(min(end, T), first))
        return experts_fn(hidden_states[tokens], gate_up_proj, down_proj, topk_ids[tokens] - first_expert,
                          topk_weights[tokens])

    own_apart = world_size >= OWN_APART_MIN_RANKS
    returns = []
    for (first, end), (received, work) in zip(pieces, gathers):
        middle = min(first + round((end - first) * OWN_SHARE_DURING_DISPATCH), T)
        own_first = own_experts(first, middle) if own_apart else None
        work.wait()
        x_received, ids_received, weights_received = _unpack(received, H, K)
        rows = end - first
        # other ranks' experts and the padding's -1 (and this rank's own block when it runs
        # apart) fall outside [0, E/W): dropped
        local_ids = (ids_received - first_expert).view(world_size, rows, K)
        if own_apart:
            local_ids[rank] = -1
        partial = experts_fn(x_received, gate_up_proj, down_proj, local_ids.view(-1, K), weights_received)
        summed = partial.new_empty((rows, H))  # every rank's partial sums for this rank's rows
        work = dist.reduce_scatter_tensor(summed, partial.contiguous(), group=group, async_op=True)
        returns.append((summed, work, own_first, own_experts(middle, end) if own_apart else None))
    out = hidden_states.new_empty((T, H))
    for (first, end), (summed, work, own_first, own_second) in zip(pieces, returns):
        work.wait()
        tokens = max(min(end, T) - first, 0)
        if not own_apart:
            out[first:first + tokens] = summed[:tokens]
            continue
        middle = own_first.shape[0]
        torch.add(summed[:middle], own_first, out=out[first:first + middle])
        torch.add(summed[middle:tokens], own_second, out=out[first + middle:first + tokens])
    return out


def _pack_fixed(hidden_states, topk_ids, topk_weights, first, end):
    """[end - first, H + M] rows for capacity rows [first, end): each token's hidden row, its global
    ids and its weights' bits (as ``_pack``); rows past the tokens are padding with ids -1 (their
    hidden part is left unset: no expert reads it)."""
    T, H = hidden_states.shape
    K = topk_ids.shape[1]
    tokens = max(min(end, T) - first, 0)
    meta = torch.full((end - first, 2 * K), -1, dtype=torch.int32, device=hidden_states.device)
    meta[:tokens, :K] = topk_ids[first:first + tokens]
    meta[:tokens, K:] = topk_weights[first:first + tokens].float().view(torch.int32)
    meta = meta.view(hidden_states.dtype)
    packed = hidden_states.new_empty((end - first, H + meta.shape[1]))
    packed[:tokens, :H] = hidden_states[first:first + tokens]
    packed[:, H:] = meta
    return packed
