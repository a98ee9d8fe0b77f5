"""The energy-aware router's per-call tallies in one launch (eager decode is host-bound: the
dozen small torch ops they replace cost ~1 ms a layer on an H100 host).

For a batch whose plain top-k chose ``plain_ids`` [T, K] and whose biased top-k chose
``topk_ids`` [T, K] with gate ``weights`` [T, K], it adds, in place and without a host sync:

- to ``stats`` [8] int64 (``STAT_FIELDS`` order): 1 call, T tokens, tokens with a slot outside
  their plain set, such slots, experts used, experts plain top-k used, NaN tokens, slots of
  positive weight;
- to ``window`` [2, E] float32: tokens each expert ran, and 1 for each expert that ran at all.

Ids outside [0, E) count as no expert: such a slot is neither a load nor a change, and it keeps
no slot of the plain set. ``routing_tallies_reference`` is the same in torch.
"""
import torch
import triton
import triton.language as tl

from kernels.tiles import next_power_of_2
from kernels.validate import INDEX_DTYPES, check_int, check_tensor

STAT_FIELDS = ("calls", "tokens", "rerouted_tokens", "changed_slots", "distinct_experts", "plain_distinct_experts",
               "nan_tokens", "active_slots")


@triton.jit
def _routing_tally_kernel(
    p_plain, p_ids, p_weights, p_nan, p_stats, p_window, T, E,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BINS: tl.constexpr,
    TRACK_STATS: tl.constexpr, TRACK_WINDOW: tl.constexpr,
):
    b_loads = tl.zeros((BINS,), dtype=tl.int32)
    b_plain_loads = tl.zeros((BINS,), dtype=tl.int32)
    n_rerouted, n_changed, n_active = tl.zeros((), dtype=tl.int64), tl.zeros((), dtype=tl.int64), \
        tl.zeros((), dtype=tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_tk = (o_t[:, None] < T) & (o_k[None, :] < TOP_K)  # [BT, BK]
        o_tk = o_t[:, None] * TOP_K + o_k[None, :]
        b_ids = tl.load(p_ids + o_tk, mask=m_tk, other=E)
        b_plain = tl.load(p_plain + o_tk, mask=m_tk, other=E)
        b_ids = tl.where(m_tk & (b_ids >= 0) & (b_ids < E), b_ids, E).to(tl.int32)  # bad ids -> spare bin E
        b_plain = tl.where(m_tk & (b_plain >= 0) & (b_plain < E), b_plain, E).to(tl.int32)
        b_loads += tl.histogram(tl.reshape(b_ids, (BLOCK_T * BLOCK_K,)), BINS)
        b_plain_loads += tl.histogram(tl.reshape(b_plain, (BLOCK_T * BLOCK_K,)), BINS)
        # a slot changed when its (valid) expert is not among the token's valid plain experts: [BT, BK, BK]
        b_same = (b_ids[:, :, None] == b_plain[:, None, :]) & (b_plain < E)[:, None, :]
        b_kept = tl.max(b_same.to(tl.int32), axis=2)
        b_moved = (m_tk & (b_ids < E) & (b_kept == 0)).to(tl.int64)  # [BT, BK]
        n_changed += tl.sum(tl.sum(b_moved, axis=1), axis=0)
        n_rerouted += tl.sum(tl.max(b_moved, axis=1), axis=0)
        b_weights = tl.load(p_weights + o_tk, mask=m_tk, other=0.0)
        n_active += tl.sum(tl.sum((b_weights > 0).to(tl.int64), axis=1), axis=0)
    o_e = tl.arange(0, BINS)
    m_e = o_e < E
    b_ran = m_e & (b_loads > 0)
    if TRACK_STATS:
        n_distinct = tl.sum(b_ran.to(tl.int64), axis=0)
        n_plain_distinct = tl.sum((m_e & (b_plain_loads > 0)).to(tl.int64), axis=0)
        n_nan = tl.load(p_nan).to(tl.int64)
        o_f = tl.arange(0, 8)  # STAT_FIELDS
        b_add = tl.where(o_f == 0, 1, 0).to(tl.int64) + tl.where(o_f == 1, T, 0).to(tl.int64) \
            + tl.where(o_f == 2, n_rerouted, 0) + tl.where(o_f == 3, n_changed, 0) \
            + tl.where(o_f == 4, n_distinct, 0) + tl.where(o_f == 5, n_plain_distinct, 0) \
            + tl.where(o_f == 6, n_nan, 0) + tl.where(o_f == 7, n_active, 0)
        tl.store(p_stats + o_f, tl.load(p_stats + o_f) + b_add)
    if TRACK_WINDOW:
        p_tokens, p_batches = p_window + o_e, p_window + E + o_e
        tl.store(p_tokens, tl.load(p_tokens, mask=m_e, other=0.0) + b_loads.to(tl.float32), mask=m_e)
        tl.store(p_batches, tl.load(p_batches, mask=m_e, other=0.0) + b_ran.to(tl.float32), mask=m_e)


def routing_tallies(plain_ids: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, nan_tokens: torch.Tensor,
                    num_experts: int, stats: torch.Tensor | None = None, window: torch.Tensor | None = None) -> None:
    """Add one routing call's tallies to ``stats`` [8] int64 and/or ``window`` [2, E] float32 in
    place (either may be None); see the module docstring. One launch, no host sync."""
    num_experts = _check(plain_ids, topk_ids, weights, nan_tokens, num_experts, stats, window)
    if stats is None and window is None:
        return
    T, K = topk_ids.shape
    block_k = next_power_of_2(K)
    _routing_tally_kernel[(1,)](
        plain_ids.contiguous(), topk_ids.contiguous(), weights.contiguous(), nan_tokens,
        stats if stats is not None else nan_tokens, window if window is not None else weights, T, num_experts,
        TOP_K=K, BLOCK_T=max(1, min(256, 2048 // block_k)), BLOCK_K=block_k,
        BINS=next_power_of_2(num_experts + 1), TRACK_STATS=stats is not None, TRACK_WINDOW=window is not None,
    )


def tally_summary(stats: torch.Tensor, top_k: int) -> dict[str, int | float]:
    """The ``stats`` [8] tallies as Python numbers (one device sync), with their per-token and
    per-call fractions."""
    values = dict(zip(STAT_FIELDS, stats.tolist()))
    calls, tokens = max(values["calls"], 1), max(values["tokens"], 1)
    return values | {
        "rerouted_fraction": values["rerouted_tokens"] / tokens,
        "changed_slot_fraction": values["changed_slots"] / (tokens * top_k),
        "distinct_experts_per_call": values["distinct_experts"] / calls,
        "plain_distinct_experts_per_call": values["plain_distinct_experts"] / calls,
        "active_experts_per_token": values["active_slots"] / tokens,
    }


def routing_tallies_reference(plain_ids: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor,
                              nan_tokens: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats increments [8] int64, window increments [2, E] float32) in torch."""
    loads, plain_loads = expert_loads_reference(topk_ids, num_experts), expert_loads_reference(plain_ids, num_experts)
    valid, plain_valid = ((ids >= 0) & (ids < num_experts) for ids in (topk_ids, plain_ids))
    same = (topk_ids[:, :, None].long() == plain_ids[:, None, :].long()) & plain_valid[:, None, :]
    moved = valid & ~same.any(2)  # [T, K]
    stats = torch.stack([torch.as_tensor(v, device=loads.device).reshape(()).long() for v in (
        1, topk_ids.shape[0], moved.any(1).sum(), moved.sum(), (loads > 0).sum(), (plain_loads > 0).sum(),
        nan_tokens.sum(), (weights > 0).sum())])
    return stats, torch.stack((loads, (loads > 0).float()))


def expert_loads_reference(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, [E] float32; ids outside [0, E) count for no expert."""
    ids = ids.reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return torch.zeros(num_experts, device=ids.device).index_add_(0, ids, torch.ones(ids.shape, device=ids.device))


def _check(plain_ids, topk_ids, weights, nan_tokens, num_experts, stats, window):
    check_tensor("plain_ids", plain_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("weights", weights, ndim=2)
    check_tensor("nan_tokens", nan_tokens, ndim=1, dtypes=(torch.int32,))
    num_experts = check_int("num_experts", num_experts, 1)
    if topk_ids.shape[1] == 0:
        raise ValueError(f"topk_ids must choose at least one expert per token, got shape {tuple(topk_ids.shape)}")
    for name, t in (("plain_ids", plain_ids), ("weights", weights)):
        if t.shape != topk_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(topk_ids.shape)} (topk_ids')")
    if nan_tokens.numel() != 1:
        raise ValueError(f"nan_tokens must hold one count, got shape {tuple(nan_tokens.shape)}")
    if stats is not None:
        check_tensor("stats", stats, ndim=1, dtypes=(torch.int64,))
        if stats.numel() != len(STAT_FIELDS) or not stats.is_contiguous():
            raise ValueError(f"stats must be a contiguous [{len(STAT_FIELDS)}] tensor, got {tuple(stats.shape)}")
    if window is not None:
        check_tensor("window", window, ndim=2, dtypes=(torch.float32,))
        if tuple(window.shape) != (2, num_experts) or not window.is_contiguous():
            raise ValueError(f"window must be a contiguous [2, {num_experts}] tensor, got {tuple(window.shape)}")
    tensors = {"plain_ids": plain_ids, "topk_ids": topk_ids, "weights": weights, "nan_tokens": nan_tokens,
               "stats": stats, "window": window}
    devices = {k: str(t.device) for k, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all on one device, got {devices}")
    return num_experts
