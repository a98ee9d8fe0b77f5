"""The energy-aware selection bias: each expert's marginal *measured* cost, in one kernel launch.

Plain top-k puts a load n_e on each expert. A token weighing expert e sees the load the other
tokens put on it, m_e = max(n_e - 1, 0): an idle (or singleton) expert costs it cost(1), the
fixed weight load; a busy one costs cost(m_e + 1) - cost(m_e), the per-token part. ``cost(b)`` is
one expert's cost at b tokens from the cost table (log-log interpolation of its measured points),
stretched like ``KernelCostModel.get_cost``: by the SM clock the calibration saw at the current
temperature, and by the op's memory-pressure curve (a prior table has none: its roofline stretch
at one token stands in); stretched time costs idle power. With E1, L1 the unstretched one-token
costs, the score and bias are

    s_e = w_energy * g(T) * dE_e / E1 + w_latency * dL_e / L1
    g(T) = 1 + thermal_gain * clamp((T - (T_slowdown - margin)) / margin, 0, 1)
    bias_e = clamp(offset_e - max_shift * s_e / (1 + s_e), -max_shift, 0)

The optional ``extra_cost`` [2, E] float32 device tensor (xE_e, xL_e: energy_j, latency_ms per
routed token) is what each expert costs beyond its compute, e.g. the all_to_all that sends a token
to a remote expert and back (0 for local experts; unstretched: the communication curve is its
own measurement). It is a per-token cost, so it is scored against a token's marginal compute,
not against the weight load: with n the mean load of the busy experts and dE_n = cost(n + 1) -
cost(n) (likewise dL_n), s_e gains w_energy * g(T) * xE_e / dE_n + w_latency * xL_e / dL_n.
(Scored against E1 instead, a transfer worth 1.6 tokens' compute moved a Qwen3 layer's bias by
< 0.001 at 8192 tokens, where one token's compute is ~300x smaller than a weight load.) The
test-time step, which is scale-free, charges it per routed token. Without it a constexpr flag
compiles its loads out.

The hardware state is a [3] float32 tensor (temperature °C, power W, NVML memory utilisation
0..1; NaN = unknown: the coolest calibrated temperature and no pressure), on the kernels' device
or in pinned host memory, which they read in place (``kernels.pinned_state``). One program does it all
(histogram of the ids, interpolation, stretch, bias): no host sync, CUDA-graph capturable.
``ttt_offset_step`` is the router's test-time update of the offsets, also one launch. The
``*_reference`` functions are the same in torch.
"""
import torch
import triton
import triton.language as tl

from kernels.cost_scoring import (CostCurves, bias_from_loads, bias_from_loads_reference, check_cost_inputs,
                                  check_extra_cost, check_knob, clamp, cost_constants, cost_curves, cost_reference,
                                  energy_weight_reference, expert_cost_reference, hardware_stretch,
                                  hardware_stretch_reference, score, score_reference, stretched_cost)
from kernels.routing_stats import expert_loads_reference
from kernels.tiles import next_power_of_2
from kernels.validate import INDEX_DTYPES, check_tensor

# the curves and references the router reads come from kernels.cost_scoring; re-exported as this op's API
__all__ = ["CostCurves", "cost_curves", "energy_weight_reference", "expert_cost_bias", "expert_cost_bias_reference",
           "expert_cost_reference", "ttt_offset_step", "ttt_offset_step_reference"]


@triton.jit
def _cost_bias_kernel(
    p_ids, n_slots, p_curves, stride_row, p_state, p_offsets, p_extra, p_bias, E,
    idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
    energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
    N_TABLE: tl.constexpr, N_CLOCK: tl.constexpr, N_PRESSURE: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr, BINS: tl.constexpr,
):
    # loads: a histogram of the plain ids [n_slots]; invalid ids and padding land in the spare bin E
    b_loads = tl.zeros((BINS,), dtype=tl.int32)
    for s0 in range(0, n_slots, BLOCK):
        o_s = s0 + tl.arange(0, BLOCK)
        b_ids = tl.load(p_ids + o_s, mask=o_s < n_slots, other=E)
        b_ids = tl.where((b_ids >= 0) & (b_ids < E), b_ids, E).to(tl.int32)
        b_loads += tl.histogram(b_ids, BINS)
    b_bias = bias_from_loads(
        b_loads, p_curves, stride_row, p_state, p_offsets, p_extra, E,
        idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
        energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
        N_TABLE, N_CLOCK, N_PRESSURE, HAS_EXTRA, BINS, SELF_IN_LOADS=True)
    o_e = tl.arange(0, BINS)
    tl.store(p_bias + o_e, b_bias, mask=o_e < E)


@triton.jit
def _offset_step_kernel(
    p_window, p_curves, stride_row, p_state, p_offsets, p_extra, E,
    idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
    energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure, lr,
    N_TABLE: tl.constexpr, N_CLOCK: tl.constexpr, N_PRESSURE: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BINS: tl.constexpr,
):
    # window [2, E]: tokens each expert ran, and in how many batches it ran
    o_e = tl.arange(0, BINS)
    m_e = o_e < E
    b_tokens = tl.load(p_window + o_e, mask=m_e, other=0.0)
    b_batches = tl.load(p_window + E + o_e, mask=m_e, other=0.0)
    b_temp, b_stretch = hardware_stretch(p_curves, stride_row, p_state, o_e, cool_temp_c, fastest_clock_mhz,
                                          max_memory_pressure, N_CLOCK, N_PRESSURE)
    b_load = tl.maximum(b_tokens / tl.maximum(b_batches, 1.0), 1.0)  # tokens per batch in which it ran
    energy_j, latency_ms = stretched_cost(p_curves, stride_row, b_load, b_stretch, idle_power_w, N_TABLE)
    if HAS_EXTRA:  # paid by every routed token: b_load of them
        energy_j += b_load * tl.load(p_extra + o_e, mask=m_e, other=0.0)
        latency_ms += b_load * tl.load(p_extra + E + o_e, mask=m_e, other=0.0)
    b_per_token = score(energy_j, latency_ms, b_temp, fixed_energy_j, fixed_latency_ms, slowdown_temp_c,
                         energy_weight, latency_weight, thermal_gain, thermal_margin_c) / b_load
    target = tl.sum(b_per_token * b_tokens, 0) / tl.maximum(tl.sum(b_tokens, 0), 1.0)
    b_step = tl.where(b_per_token < target, 1.0, tl.where(b_per_token > target, -1.0, 0.0))  # cheaper: attract
    b_step = tl.where(b_tokens > 0, b_step, 0.0)
    b_offsets = tl.load(p_offsets + o_e, mask=m_e, other=0.0) + lr * b_step
    tl.store(p_offsets + o_e, clamp(b_offsets, -max_shift, max_shift), mask=m_e)
    tl.store(p_window + o_e, tl.zeros((BINS,), dtype=tl.float32), mask=m_e)
    tl.store(p_window + E + o_e, tl.zeros((BINS,), dtype=tl.float32), mask=m_e)


def expert_cost_bias(topk_ids: torch.Tensor, curves: CostCurves, hardware_state: torch.Tensor,
                     bias_offsets: torch.Tensor, *, energy_weight: float, latency_weight: float, max_shift: float,
                     thermal_gain: float = 1.0, thermal_margin_c: float = 15.0, max_memory_pressure: float = 0.9,
                     extra_cost: torch.Tensor | None = None) -> torch.Tensor:
    """The [E] float32 selection bias (E = ``bias_offsets``' length) for a batch whose plain top-k
    chose ``topk_ids`` [T, K]; ``extra_cost`` [2, E] (or None) adds each expert's per-token cost
    beyond its compute; see the module docstring. No host sync."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    extra = check_extra_cost(extra_cost, bias_offsets)
    check_cost_inputs(curves, hardware_state, bias_offsets, topk_ids=topk_ids, extra_cost=extra)
    E = bias_offsets.shape[0]
    bias = torch.empty(E, dtype=torch.float32, device=bias_offsets.device)
    ids = topk_ids.contiguous().view(-1)  # the kernel indexes it with unit stride (a [T, 1] slice may not have it)
    _cost_bias_kernel[(1,)](
        ids, ids.numel(), curves.packed, curves.packed.stride(0), hardware_state, bias_offsets, extra, bias, E,
        *cost_constants(curves, energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c,
                    max_memory_pressure),
        N_TABLE=curves.n_table, N_CLOCK=curves.n_clock, N_PRESSURE=curves.n_pressure,
        HAS_EXTRA=extra_cost is not None, BLOCK=min(1024, next_power_of_2(max(ids.numel(), 16))),
        BINS=next_power_of_2(E + 1),
    )
    return bias


def ttt_offset_step(window: torch.Tensor, curves: CostCurves, hardware_state: torch.Tensor,
                    bias_offsets: torch.Tensor, *, lr: float, energy_weight: float, latency_weight: float,
                    max_shift: float, thermal_gain: float = 1.0, thermal_margin_c: float = 15.0,
                    max_memory_pressure: float = 0.9, extra_cost: torch.Tensor | None = None) -> None:
    """One test-time step of ``bias_offsets`` [E] in place, from ``window`` [2, E] float32 (tokens each
    expert ran since the last step, and in how many batches), which it then zeroes; one launch.

    Each expert that ran gets its amortised score per routed token, s(cost at its mean load plus
    ``extra_cost`` [2, E] per token, if given) / mean load; experts cheaper than the token-weighted
    mean step up by ``lr`` (attract tokens), dearer ones step down (DeepSeek's sign step, aimed at
    cost per token, not load balance). Offsets stay in [-max_shift, max_shift]."""
    check_knob("lr", lr, positive=True)
    _check_window(window, bias_offsets)
    extra = check_extra_cost(extra_cost, bias_offsets)
    check_cost_inputs(curves, hardware_state, bias_offsets, window=window, extra_cost=extra)
    E = bias_offsets.shape[0]
    _offset_step_kernel[(1,)](
        window, curves.packed, curves.packed.stride(0), hardware_state, bias_offsets, extra, E,
        *cost_constants(curves, energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c,
                    max_memory_pressure), float(lr),
        N_TABLE=curves.n_table, N_CLOCK=curves.n_clock, N_PRESSURE=curves.n_pressure,
        HAS_EXTRA=extra_cost is not None, BINS=next_power_of_2(E + 1),
    )


def _check_window(window, bias_offsets):
    check_tensor("window", window, ndim=2, dtypes=(torch.float32,))
    if tuple(window.shape) != (2, bias_offsets.shape[0]) or not window.is_contiguous():
        raise ValueError(f"window must be a contiguous [2, {bias_offsets.shape[0]}] tensor, got "
                         f"{tuple(window.shape)}")


def expert_cost_bias_reference(topk_ids: torch.Tensor, curves: CostCurves, hardware_state: torch.Tensor,
                               bias_offsets: torch.Tensor, *, energy_weight: float, latency_weight: float,
                               max_shift: float, thermal_gain: float = 1.0, thermal_margin_c: float = 15.0,
                               max_memory_pressure: float = 0.9,
                               extra_cost: torch.Tensor | None = None) -> torch.Tensor:
    """``expert_cost_bias`` in torch."""
    return bias_from_loads_reference(expert_loads_reference(topk_ids, bias_offsets.shape[0]), curves, hardware_state,
                                     bias_offsets, energy_weight=energy_weight, latency_weight=latency_weight,
                                     max_shift=max_shift, thermal_gain=thermal_gain,
                                     thermal_margin_c=thermal_margin_c, max_memory_pressure=max_memory_pressure,
                                     extra_cost=extra_cost, self_in_loads=True)


def ttt_offset_step_reference(window: torch.Tensor, curves: CostCurves, hardware_state: torch.Tensor,
                              bias_offsets: torch.Tensor, *, lr: float, energy_weight: float, latency_weight: float,
                              max_shift: float, thermal_gain: float = 1.0, thermal_margin_c: float = 15.0,
                              max_memory_pressure: float = 0.9, extra_cost: torch.Tensor | None = None) -> None:
    """``ttt_offset_step`` in torch (also in place)."""
    tokens, batches = window
    temp, stretch = hardware_stretch_reference(curves, hardware_state, max_memory_pressure)
    load = (tokens / batches.clamp_min(1.0)).clamp_min(1.0)
    energy, latency = cost_reference(curves, load, stretch)
    if extra_cost is not None:
        energy, latency = energy + load * extra_cost[0], latency + load * extra_cost[1]
    per_token = score_reference(curves, energy, latency, temp, energy_weight, latency_weight, thermal_gain,
                                 thermal_margin_c) / load
    target = (per_token * tokens).sum() / tokens.sum().clamp_min(1.0)
    step = torch.sign(target - per_token) * (tokens > 0)
    bias_offsets.add_(step, alpha=lr).clamp_(-max_shift, max_shift)
    window.zero_()
