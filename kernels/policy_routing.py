"""Baseline-preserving re-routing: keep each token's best experts, fill its other slots cheaply.

Two passes over the tokens: in registers, in one launch of one program, when the tokens fit one
block (the launch config's tokens per program, ``kernels/configs/policy_routing``: decode batches),
else two launches over a grid of token blocks:

1. plain top-k (``kernels.routing``'s rules: fp32 softmax, the caller's additive selection bias,
   masked experts, lowest index on ties). Each token *keeps* a prefix of its plain slots: the
   first ``keep_top_k``, or (``keep_share``) those whose higher-ranked slots hold less than
   ``keep_share`` of its top-k gate weight, so at least one. A slot of weight 0 (a masked spare)
   is never kept. The kept experts' loads n_e (how many tokens keep e) are the batch's baseline.
2. a fill bias [E] from those loads, then each token's remaining slots take, in order, its
   highest ``probability + selection bias + fill bias`` experts among those it did not keep:
   - ``fill="cost"``: the energy-aware bias (``kernels.cost_bias``) with the loads as the *other*
     tokens' (a token never fills with an expert it keeps): an expert some token keeps costs its
     per-token work, an idle one its weight read, from the cost table at the live hardware state.
     Every bias lies in [-max_shift, 0], so a fill crosses at most max_shift of probability.
   - ``fill="active"``: Opportunistic Expert Activation (arXiv 2511.02237): only experts some
     token keeps are selectable (bias 0; idle experts are masked).
   A fill wakes an idle expert only where its probability exceeds its *price*, minus the fill
   bias (its weight read, scored): leaving the slot out saves that read and gives up the
   probability, so the expert is worth waking when ``probability + fill bias > 0``. At batch 1
   every unkept expert is idle and priced near max_shift, so a lone token runs about its kept
   experts, as under OEA; a hotter card (a larger energy weight) raises every price. A woken
   expert is never refused: the per-token work it adds is free at decode (on the H200 a policy
   that left such slots empty spent no less MoE-layer energy, and lost bits/byte). A slot left
   with no selectable expert is *empty*: id -1, weight 0. ``fused_experts`` (and so
   ``FusedMoE``) skips such slots, so an empty slot costs nothing.

Gate weights are the unbiased probabilities of the chosen experts (renormalised over them with
``renormalize``): the biases move selection only. ``plain_ids``, the kept counts and the fill
bias come back too, for statistics. No host sync: capturable in a CUDA graph.
Every grid program recomputes the [E] bias from the loads (E values: cheaper than a third launch).
``policy_routing_reference`` is the same in torch.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._library import kernel_op
from kernels.cost_scoring import (bias_from_loads, bias_from_loads_reference, check_cost_inputs, check_extra_cost,
                                  cost_constants)
from kernels.routing import (UNSELECTABLE, _bias_vector, _pick, _probabilities, _renormalized, _selection, _top_k,
                             check_selection_bias, launch_config, route_reference)
from kernels.routing_stats import expert_loads_reference
from kernels.tiles import cdiv, next_power_of_2
from kernels.validate import check_bool, check_float, check_int, check_tensor

FILL_MODES = ("cost", "active")
COST_KNOBS = ("energy_weight", "latency_weight", "max_shift", "thermal_gain", "thermal_margin_c",
              "max_memory_pressure", "extra_cost")


@dataclass(frozen=True)
class PolicyRouting:
    topk_weights: torch.Tensor  # [T, K] float32, unbiased probabilities (0 for an empty slot)
    topk_ids: torch.Tensor  # [T, K] int32, -1 for an empty slot
    plain_ids: torch.Tensor  # [T, K] int32: plain top-k
    kept: torch.Tensor  # [T] int32: the plain slots each token kept (a prefix)
    fill_bias: torch.Tensor  # [E] float32: the bias the fill used (-inf: not selectable)
    nan_tokens: torch.Tensor  # [1] int32


@dataclass(frozen=True)
class FillCost:
    """What ``fill="cost"`` reads: the cost curves, the [3] hardware state (on the logits' device,
    or pinned host memory read in place), the [E] offsets and the ``kernels.cost_bias`` knobs
    (``COST_KNOBS``)."""
    curves: object
    hardware_state: torch.Tensor
    bias_offsets: torch.Tensor
    knobs: dict


@triton.jit
def _kept_prefix(b_weights, o_k, keep_top_k, keep_share, TOP_K: tl.constexpr, KEEP_BY_SHARE: tl.constexpr):
    """[BT, BK] flags of the kept plain slots (a prefix of each row)."""
    if KEEP_BY_SHARE:
        b_total = tl.sum(b_weights, 1)
        b_ahead = tl.cumsum(b_weights, 1) - b_weights  # weight of the higher-ranked slots
        m_keep = b_ahead < keep_share * b_total[:, None]
    else:
        m_keep = o_k[None, :] < keep_top_k
    return m_keep & (b_weights > 0) & (o_k[None, :] < TOP_K)


@triton.jit
def _fill_bias(
    b_loads, E, p_curves, stride_row, p_state, p_offsets, p_extra,
    idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
    energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
    LANES: tl.constexpr, FILL_BY_COST: tl.constexpr, N_TABLE: tl.constexpr, N_CLOCK: tl.constexpr,
    N_PRESSURE: tl.constexpr, HAS_EXTRA: tl.constexpr,
):
    """The fill bias [LANES] (lane = expert) from the kept loads [LANES], which are the *other*
    tokens' loads: a token never fills with its own kept experts."""
    if FILL_BY_COST:
        b_fill = bias_from_loads(
            b_loads, p_curves, stride_row, p_state, p_offsets, p_extra, E,
            idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
            energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
            N_TABLE, N_CLOCK, N_PRESSURE, HAS_EXTRA, LANES, SELF_IN_LOADS=False)
    else:  # OEA: the experts the batch already activates, and only those
        b_fill = tl.where(b_loads > 0, 0.0, float("-inf"))
    return b_fill


@triton.jit
def _fill(b_probs, b_user, b_fill, b_idle, b_plain, b_kept, o_e, o_k, m_e, TOP_K: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(ids, weights) [BT, BK]: the kept prefix of ``b_plain`` as it was, the other slots filled by
    the biased score among the experts the token did not keep, an idle one (``b_idle`` [BE]) only
    where its probability exceeds its price -b_fill (-1 and 0 when none is left)."""
    b_select, b_gate = _selection(b_probs, (b_user + b_fill)[None, :], m_e)
    m_unpaid = b_idle[None, :] & (b_probs + b_fill[None, :] <= 0)  # waking it costs more than it brings
    b_select = tl.where(m_unpaid, float("-inf"), b_select)
    m_kept = o_k[None, :] < b_kept[:, None]
    b_kept_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(TOP_K):  # the kept experts leave the fill's choices
        b_id = tl.sum(tl.where(o_k[None, :] == k, b_plain, 0), 1)
        m_it = (o_e[None, :] == b_id[:, None]) & (k < b_kept)[:, None]  # [BT, BE]
        b_kept_weights = tl.where(o_k[None, :] == k, tl.sum(tl.where(m_it, b_probs, 0.0), 1)[:, None],
                                  b_kept_weights)
        b_select = tl.where(m_it, float("-inf"), b_select)
    b_ids = tl.where(m_kept, b_plain, -1)
    b_weights = tl.where(m_kept, b_kept_weights, 0.0)
    for k in tl.static_range(TOP_K):
        m_fill = k >= b_kept  # [BT]
        b_best, b_weight, b_score, b_rest = _pick(b_select, b_gate, o_e)
        m_found = m_fill & (b_score > UNSELECTABLE)  # a selectable expert is left
        b_ids = tl.where((o_k[None, :] == k) & m_found[:, None], b_best[:, None], b_ids)
        b_weights = tl.where((o_k[None, :] == k) & m_found[:, None], b_weight[:, None], b_weights)
        b_select = tl.where(m_fill[:, None], b_rest, b_select)
    return b_ids, _renormalized(b_weights, RENORMALIZE)


@triton.jit
def _kept_loads(b_plain, m_keep, o_e, o_k, TOP_K: tl.constexpr):
    """[BE] tokens keeping each expert (lane = expert), in registers."""
    b_loads = tl.zeros(o_e.shape, dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        b_id = tl.sum(tl.where(o_k[None, :] == k, b_plain, 0), 1)  # [BT]
        b_keeps = tl.sum(tl.where(o_k[None, :] == k, m_keep.to(tl.int32), 0), 1)  # [BT] 0/1
        b_loads += tl.sum(((o_e[None, :] == b_id[:, None]).to(tl.int32) * b_keeps[:, None]), 0)
    return b_loads


@triton.jit
def _policy_routing_kernel(
    p_logits, p_user_bias, p_weights, p_ids, p_plain, p_kept, p_fill_bias, p_nan_tokens, p_loads,
    T, E, stride_user_bias, keep_top_k, keep_share,
    p_curves, stride_row, p_state, p_offsets, p_extra,
    idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
    energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
    STRIDE_LT: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BINS: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    KEEP_BY_SHARE: tl.constexpr, FILL_BY_COST: tl.constexpr,
    N_TABLE: tl.constexpr, N_CLOCK: tl.constexpr, N_PRESSURE: tl.constexpr, HAS_EXTRA: tl.constexpr,
    PASS: tl.constexpr,
):
    """PASS 0: every token in one block of one program, all in registers (decode batches). Larger
    T: two launches over a grid of token blocks, PASS 1 (plain, kept, loads added to the zeroed
    p_loads [E]) then PASS 2 (each program computes the bias from the loads and fills its block)."""
    o_e, o_k = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_K)
    m_e = o_e < E
    b_user = _bias_vector(p_user_bias, stride_user_bias, o_e, E, BLOCK_E, HAS_BIAS)
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    m_out = m_t[:, None] & (o_k[None, :] < TOP_K)
    o_tk = o_t[:, None] * TOP_K + o_k[None, :]
    if PASS == 2:
        o_bins = tl.arange(0, BINS)
        tl.store(p_fill_bias + o_bins, _fill_bias(
            tl.load(p_loads + o_bins, mask=o_bins < E, other=0), E, p_curves, stride_row, p_state, p_offsets,
            p_extra, idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c,
            fastest_clock_mhz, energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c,
            max_memory_pressure, BINS, FILL_BY_COST, N_TABLE, N_CLOCK, N_PRESSURE, HAS_EXTRA), mask=o_bins < E)
        tl.debug_barrier()  # every program stores the same bias (identical writes) and reads it in its layout
        b_fill = tl.load(p_fill_bias + o_e, mask=m_e, other=0.0)
        b_idle = tl.load(p_loads + o_e, mask=m_e, other=0) == 0
        b_probs, _ = _probabilities(p_logits, o_t, o_e, m_t, m_e, STRIDE_LT)
        b_plain = tl.load(p_plain + o_tk, mask=m_out, other=-1)
        b_kept = tl.load(p_kept + o_t, mask=m_t, other=0)
        b_ids, b_weights = _fill(b_probs, b_user, b_fill, b_idle, b_plain, b_kept, o_e, o_k, m_e, TOP_K, BLOCK_T,
                                 BLOCK_K, RENORMALIZE)
    else:
        b_probs, m_nan = _probabilities(p_logits, o_t, o_e, m_t, m_e, STRIDE_LT)  # [BT, BE]
        b_select, b_gate = _selection(b_probs, b_user[None, :], m_e)
        b_plain, b_plain_weights = _top_k(b_select, b_gate, o_e, o_k, TOP_K, BLOCK_T, BLOCK_K)
        m_keep = _kept_prefix(b_plain_weights, o_k, keep_top_k, keep_share, TOP_K, KEEP_BY_SHARE) & m_t[:, None]
        b_kept = tl.sum(m_keep.to(tl.int32), 1)
        tl.store(p_plain + o_tk, b_plain, mask=m_out)
        tl.store(p_kept + o_t, b_kept, mask=m_t)
        tl.atomic_add(p_nan_tokens, tl.sum(m_nan.to(tl.int32), 0))
        b_loads = _kept_loads(b_plain, m_keep, o_e, o_k, TOP_K)  # [BE]
        if PASS == 1:
            tl.atomic_add(p_loads + o_e, b_loads, mask=m_e & (b_loads > 0))
        else:
            b_fill = _fill_bias(b_loads, E, p_curves, stride_row, p_state, p_offsets, p_extra, idle_power_w,
                                fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
                                energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c,
                                max_memory_pressure, BLOCK_E, FILL_BY_COST, N_TABLE, N_CLOCK, N_PRESSURE, HAS_EXTRA)
            tl.store(p_fill_bias + o_e, b_fill, mask=m_e)
            b_ids, b_weights = _fill(b_probs, b_user, b_fill, b_loads == 0, b_plain, b_kept, o_e, o_k, m_e, TOP_K,
                                     BLOCK_T, BLOCK_K, RENORMALIZE)
    if PASS != 1:
        tl.store(p_ids + o_tk, b_ids, mask=m_out)
        tl.store(p_weights + o_tk, b_weights, mask=m_out)


def policy_routing(router_logits: torch.Tensor, top_k: int, *, fill: str, keep_top_k: int | None = None,
                   keep_share: float | None = None, selection_bias: torch.Tensor | None = None,
                   renormalize: bool = True, cost: FillCost | None = None, config: dict | None = None) -> PolicyRouting:
    """Baseline-preserving top-k routing (module docstring).

    Args:
        router_logits: [T, E] float tensor, contiguous in its last dim.
        top_k: slots per token, 1 <= top_k <= E.
        fill: ``"cost"`` (the energy-aware fill; needs ``cost``, a ``FillCost``) or ``"active"`` (OEA).
        keep_top_k: keep each token's first ``keep_top_k`` plain slots (1..top_k); or
        keep_share: keep the slots until they hold ``keep_share`` of the token's top-k weight, in (0, 1].
            Exactly one of the two.
        selection_bias: optional [E] float32 added to the probabilities for selection (both passes).
        renormalize: divide the chosen weights by their sum.
        config: overrides the launch config (``kernels.routing.launch_config``): the tuner's candidate.
    Returns:
        ``PolicyRouting``. One launch when T fits one program's block, else two; no host sync.
    """
    T, E = _check_logits(router_logits)
    top_k = check_int("top_k", top_k, 1, E)
    keep_top_k, keep_share = _check_keep(keep_top_k, keep_share, top_k)
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
    if (fill == "cost") != (cost is not None):
        raise ValueError("fill='cost' needs cost (a FillCost), and fill='active' takes none")
    check_selection_bias(selection_bias, E, router_logits.device)
    renormalize = check_bool("renormalize", renormalize)
    cost_tensors, constants, flags = _cost_arguments(cost, E, router_logits)
    args = (router_logits, top_k, keep_top_k or 0, keep_share or 0.0, keep_share is not None, selection_bias,
            renormalize, fill == "cost", *cost_tensors, constants, *flags)
    routing = launch_policy_routing(*args, config=config) if config is not None else _policy_routing_op(*args)
    return PolicyRouting(*routing)


def launch_policy_routing(router_logits: torch.Tensor, top_k: int, keep_top_k: int, keep_share: float,
                          keep_by_share: bool, selection_bias: torch.Tensor | None, renormalize: bool,
                          fill_by_cost: bool, packed: torch.Tensor, hardware_state: torch.Tensor,
                          bias_offsets: torch.Tensor, extra_cost: torch.Tensor, constants: list[float], n_table: int,
                          n_clock: int, n_pressure: int, has_extra: bool,
                          config: dict | None = None) -> tuple[torch.Tensor, ...]:
    """The one or two launches on validated, flattened arguments (what the custom op runs):
    (weights, ids, plain ids, kept, fill bias, NaN tokens)."""
    T, E = router_logits.shape
    device = router_logits.device
    weights = torch.empty((T, top_k), dtype=torch.float32, device=device)
    ids, plain = (torch.empty((T, top_k), dtype=torch.int32, device=device) for _ in range(2))  # no shared storage
    kept = torch.empty(T, dtype=torch.int32, device=device)
    fill_bias = torch.empty(E, dtype=torch.float32, device=device)
    nan_tokens = torch.zeros(1, dtype=torch.int32, device=device)
    block_t, num_warps = launch_config("policy_routing", T, E, device, config)
    fused = T <= block_t
    loads = torch.zeros(0 if fused else E, dtype=torch.int32, device=device)
    args = (router_logits, selection_bias, weights, ids, plain, kept, fill_bias, nan_tokens, loads,
            T, E, selection_bias.stride(0) if selection_bias is not None else 0,
            keep_top_k, keep_share, packed, packed.stride(0), hardware_state, bias_offsets, extra_cost, *constants)
    meta = dict(STRIDE_LT=router_logits.stride(0), TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=next_power_of_2(E),
                BLOCK_K=next_power_of_2(top_k), BINS=next_power_of_2(E + 1), HAS_BIAS=selection_bias is not None,
                RENORMALIZE=renormalize, KEEP_BY_SHARE=keep_by_share, FILL_BY_COST=fill_by_cost, num_warps=num_warps,
                N_TABLE=n_table, N_CLOCK=n_clock, N_PRESSURE=n_pressure, HAS_EXTRA=has_extra)
    if fused:
        _policy_routing_kernel[(1,)](*args, **meta, PASS=0)
    else:
        grid = (cdiv(T, block_t),)
        _policy_routing_kernel[grid](*args, **meta, PASS=1)
        _policy_routing_kernel[grid](*args, **meta, PASS=2)
    return weights, ids, plain, kept, fill_bias, nan_tokens


def _policy_fake(router_logits, top_k, *rest):
    T, E = router_logits.shape
    new = router_logits.new_empty
    return (new((T, top_k), dtype=torch.float32), new((T, top_k), dtype=torch.int32),
            new((T, top_k), dtype=torch.int32), new((T,), dtype=torch.int32), new((E,), dtype=torch.float32),
            new((1,), dtype=torch.int32))


_policy_routing_op = kernel_op(
    "policy_routing",
    "(Tensor router_logits, int top_k, int keep_top_k, float keep_share, bool keep_by_share, Tensor? selection_bias, "
    "bool renormalize, bool fill_by_cost, Tensor packed, Tensor hardware_state, Tensor bias_offsets, "
    "Tensor extra_cost, float[] constants, int n_table, int n_clock, int n_pressure, bool has_extra) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    launch_policy_routing, fake=_policy_fake)


def _check_logits(router_logits):
    check_tensor("router_logits", router_logits, ndim=2)
    T, E = router_logits.shape
    if E == 0:
        raise ValueError(f"router_logits must score at least one expert, got shape {tuple(router_logits.shape)}")
    if router_logits.stride(1) != 1 and E > 1:
        raise ValueError(f"router_logits must be contiguous in its last dim, got strides {router_logits.stride()}")
    return T, E


def _check_keep(keep_top_k, keep_share, top_k):
    if (keep_top_k is None) == (keep_share is None):
        raise ValueError(f"give exactly one of keep_top_k and keep_share, got {keep_top_k!r} and {keep_share!r}")
    if keep_top_k is not None:
        return check_int("keep_top_k", keep_top_k, 1, top_k), None
    check_float("keep_share", keep_share, low=0.0, high=1.0, low_open=True)
    return None, float(keep_share)


def _cost_arguments(cost, num_experts, router_logits):
    """The kernel's cost-table tensors (packed curves, state, offsets, extra cost), float constants
    and (N_TABLE, N_CLOCK, N_PRESSURE, HAS_EXTRA); stand-ins the kernel never reads for OEA."""
    if cost is None:
        return (router_logits,) * 4, [0.0] * 12, (2, 1, 2, False)
    if not isinstance(cost, FillCost):
        raise TypeError(f"cost must be a FillCost, got {type(cost).__name__}")
    unknown = set(cost.knobs) - set(COST_KNOBS)
    if unknown:
        raise ValueError(f"cost.knobs has unknown keys {sorted(unknown)}; expected some of {list(COST_KNOBS)}")
    knobs = _knobs_with_defaults(cost.knobs)
    extra_cost = knobs.pop("extra_cost")
    extra = check_extra_cost(extra_cost, cost.bias_offsets)
    check_cost_inputs(cost.curves, cost.hardware_state, cost.bias_offsets, router_logits=router_logits,
                      extra_cost=extra)
    if cost.bias_offsets.shape[0] != num_experts:
        raise ValueError(f"cost.bias_offsets has {cost.bias_offsets.shape[0]} experts; router_logits scores "
                         f"{num_experts}")
    curves = cost.curves
    constants = [float(c) for c in cost_constants(curves, **knobs)]
    return ((curves.packed, cost.hardware_state, cost.bias_offsets, extra), constants,
            (curves.n_table, curves.n_clock, curves.n_pressure, extra_cost is not None))


def policy_routing_reference(router_logits: torch.Tensor, top_k: int, *, fill: str, keep_top_k: int | None = None,
                             keep_share: float | None = None, selection_bias: torch.Tensor | None = None,
                             renormalize: bool = True, cost: FillCost | None = None,
                             fill_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``policy_routing`` in torch: (weights [T, K] float32, ids [T, K] int64, kept [T], fill bias [E]).
    ``fill_bias`` given (e.g. the kernel's) replaces the computed one: the selection is then
    compared exactly, apart from the bias's last-ulp differences in exp and log."""
    T, E = router_logits.shape
    plain_weights, plain_ids = route_reference(router_logits, top_k, selection_bias, renormalize=False)
    slot = torch.arange(top_k, device=router_logits.device)
    if keep_share is not None:
        ahead = plain_weights.cumsum(1) - plain_weights
        keep = ahead < keep_share * plain_weights.sum(1, keepdim=True)
    else:
        keep = slot[None, :] < keep_top_k
    keep = keep & (plain_weights > 0)
    kept = keep.sum(1)
    loads = expert_loads_reference(torch.where(keep, plain_ids, -1), E)
    if fill_bias is not None:
        fill_bias = fill_bias.float()
    elif fill == "cost":
        fill_bias = bias_from_loads_reference(loads, cost.curves, cost.hardware_state, cost.bias_offsets,
                                              **_knobs_with_defaults(cost.knobs), self_in_loads=False)
    else:
        fill_bias = torch.where(loads > 0, 0.0, -torch.inf)
    logits = router_logits.float().nan_to_num(nan=-torch.inf, posinf=-torch.inf, neginf=-torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    user = 0.0 if selection_bias is None else selection_bias.float()
    select = probs + user + fill_bias
    unpaid = (loads == 0) & (probs + fill_bias <= 0)  # an idle expert worth less than its price
    selectable = (probs > 0) & (select > UNSELECTABLE.value) & ~unpaid
    select = torch.where(selectable, select, UNSELECTABLE.value)
    kept_experts = torch.zeros(T, E, dtype=torch.bool, device=probs.device).scatter_(1, plain_ids, keep)
    select = select.masked_fill(kept_experts, -torch.inf)
    scores, order = torch.sort(select, dim=-1, descending=True, stable=True)
    rank = (slot[None, :] - kept[:, None]).clamp_min(0)  # slot k >= kept takes the (k - kept)-th fill
    candidates, found = order.gather(1, rank), scores.gather(1, rank) > UNSELECTABLE.value
    filled = slot[None, :] >= kept[:, None]
    ids = torch.where(filled, torch.where(found, candidates, -1), plain_ids)
    weights = torch.where(ids >= 0, probs.gather(1, ids.clamp_min(0)), 0.0)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return weights, ids, kept, fill_bias


def _knobs_with_defaults(knobs):
    """The cost knobs with ``expert_cost_bias``'s defaults; energy_weight and max_shift are required."""
    missing = {"energy_weight", "max_shift"} - set(knobs)
    if missing:
        raise ValueError(f"cost.knobs needs {sorted(missing)}")
    defaults = {"latency_weight": 0.0, "thermal_gain": 1.0, "thermal_margin_c": 15.0, "max_memory_pressure": 0.9,
                "extra_cost": None}
    return defaults | dict(knobs)
