"""The cost scoring shared by the router's bias kernels (``kernels.cost_bias``) and the cost fill
of ``kernels.policy_routing``: cost curves packed for the kernels, the Triton helpers that
interpolate and stretch them and turn expert loads into a bias, the argument checks, and the same
in torch (``*_reference``). ``kernels.cost_bias``'s docstring gives the formulas."""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.pinned_state import readable_in_place
from kernels.validate import FLOAT32_MAX, check_float, check_tensor

MARGINAL_FLOOR = 1e-6  # a flat cost curve's marginal cost, as a share of the one-token cost (no division by 0)
MARGINAL_FLOOR_CONSTEXPR = tl.constexpr(MARGINAL_FLOOR)  # kernels read constexpr globals only
ROWS = ("log_batch", "log_energy", "log_latency", "temp_c", "sm_clock_mhz", "pressure", "pressure_stretch")
CURVE_KEYS = ("batch_size", "energy_j", "latency_ms", "clock", "pressure", "idle_power_w", "fixed_energy_j",
              "fixed_latency_ms", "slowdown_temp_c")


@dataclass(frozen=True)
class CostCurves:
    """One op's cost curves packed for the kernel: ``packed`` [7, N] float32 (rows ``ROWS``),
    the number of points in each curve, and the table's constants."""
    packed: torch.Tensor
    n_table: int
    n_clock: int
    n_pressure: int
    idle_power_w: float
    fixed_energy_j: float  # cost(1), unstretched
    fixed_latency_ms: float
    cool_temp_c: float  # the coolest calibrated temperature: stands in for an unknown one
    slowdown_temp_c: float  # NaN when the table has none
    fastest_clock_mhz: float


def cost_curves(curves: dict, device: torch.device | str) -> CostCurves:
    """Pack one op's curves (``costmodel.KernelCostModel.device_curves(op)``: plain numbers) for the
    kernels, on ``device``."""
    missing = sorted(set(CURVE_KEYS) - set(curves)) if isinstance(curves, dict) else None
    if missing is None:
        raise TypeError(f"curves must be a dict from KernelCostModel.device_curves, got {type(curves).__name__}")
    if missing:
        raise ValueError(f"curves lacks {missing} (build it with KernelCostModel.device_curves)")
    if len(curves["batch_size"]) < 2:
        raise ValueError(f"curves needs at least 2 measured points, got {len(curves['batch_size'])}")
    rows = [[math.log(v) for v in curves[k]] for k in ("batch_size", "energy_j", "latency_ms")]
    rows += [list(c) for c in zip(*curves["clock"])] + [list(c) for c in zip(*curves["pressure"])]
    width = max(map(len, rows))
    packed = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)
    slowdown, clock = curves["slowdown_temp_c"], curves["clock"]
    return CostCurves(packed, len(curves["batch_size"]), len(clock), len(curves["pressure"]), curves["idle_power_w"],
                      curves["fixed_energy_j"], curves["fixed_latency_ms"], float(clock[0][0]),
                      math.nan if slowdown is None else float(slowdown), float(max(c for _, c in clock)))


@triton.jit
def lerp(p_xs, p_ys, x, N: tl.constexpr):
    """Piecewise-linear y(x) through N sorted knots, extending the end segments; x: [B]."""
    b_seg = tl.zeros(x.shape, dtype=tl.int32)
    for j in tl.static_range(1, N - 1):
        b_seg += (x >= tl.load(p_xs + j)).to(tl.int32)
    x0, x1 = tl.load(p_xs + b_seg), tl.load(p_xs + b_seg + 1)
    y0, y1 = tl.load(p_ys + b_seg), tl.load(p_ys + b_seg + 1)
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@triton.jit
def stretched_cost(p_curves, stride_row, batch, stretch, idle_power_w, N_TABLE: tl.constexpr):
    """(energy_j, latency_ms) of one expert at ``batch`` tokens [B], time stretched by ``stretch``."""
    log_b = tl.log(batch)
    energy_j = tl.exp(lerp(p_curves, p_curves + stride_row, log_b, N_TABLE))
    latency_ms = tl.exp(lerp(p_curves, p_curves + 2 * stride_row, log_b, N_TABLE))
    energy_j += idle_power_w * latency_ms * 1e-3 * (stretch - 1.0)  # stretched time costs idle power
    return energy_j, latency_ms * stretch


@triton.jit
def hardware_stretch(p_curves, stride_row, p_state, o_e, cool_temp_c, fastest_clock_mhz, max_memory_pressure,
                      N_CLOCK: tl.constexpr, N_PRESSURE: tl.constexpr):
    """(temperature, time stretch) from the [3] hardware state, on every lane of ``o_e``."""
    b_temp = tl.load(p_state + o_e * 0)  # unknown (NaN) temperature -> the coolest calibrated one
    b_temp = tl.where(b_temp == b_temp, b_temp, cool_temp_c)
    b_pressure = tl.load(p_state + 2 + o_e * 0)
    b_pressure = tl.minimum(tl.maximum(tl.where(b_pressure == b_pressure, b_pressure, 0.0), 0.0), max_memory_pressure)
    b_stretch = lerp(p_curves + 5 * stride_row, p_curves + 6 * stride_row, b_pressure, N_PRESSURE)
    if N_CLOCK > 1:  # beyond the calibrated range the clock is held at its end points
        b_held = tl.minimum(tl.maximum(b_temp, tl.load(p_curves + 3 * stride_row)),
                            tl.load(p_curves + 3 * stride_row + N_CLOCK - 1))
        b_stretch *= fastest_clock_mhz / lerp(p_curves + 3 * stride_row, p_curves + 4 * stride_row, b_held, N_CLOCK)
    return b_temp, b_stretch


@triton.jit
def score(energy_j, latency_ms, b_temp, fixed_energy_j, fixed_latency_ms, slowdown_temp_c, energy_weight,
           latency_weight, thermal_gain, thermal_margin_c):
    """The unitless cost score s (module docstring), clamped at 0."""
    ramp = tl.minimum(tl.maximum((b_temp - slowdown_temp_c) / thermal_margin_c + 1.0, 0.0), 1.0)
    ramp = tl.where(ramp == ramp, ramp, 0.0)  # no slowdown threshold known (NaN): no rise
    b_score = energy_weight * (1.0 + thermal_gain * ramp) * energy_j / fixed_energy_j
    return tl.maximum(b_score + latency_weight * latency_ms / fixed_latency_ms, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp(x, low, high):
    """``x.clamp(low, high)`` as torch does it: a NaN stays NaN (Triton's min/max would drop it)."""
    x = tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def bias_from_loads(
    b_loads, p_curves, stride_row, p_state, p_offsets, p_extra, E,
    idle_power_w, fixed_energy_j, fixed_latency_ms, cool_temp_c, slowdown_temp_c, fastest_clock_mhz,
    energy_weight, latency_weight, max_shift, thermal_gain, thermal_margin_c, max_memory_pressure,
    N_TABLE: tl.constexpr, N_CLOCK: tl.constexpr, N_PRESSURE: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BINS: tl.constexpr, SELF_IN_LOADS: tl.constexpr,
):
    """The [BINS] bias from the experts' loads [BINS] (int32). With SELF_IN_LOADS the deciding token
    is one of an expert's load (plain top-k's loads), so the others put n - 1 on it; without, the
    loads are the other tokens' only (the kept experts of a baseline-preserving policy)."""
    o_e = tl.arange(0, BINS)
    m_e = o_e < E
    b_temp, b_stretch = hardware_stretch(p_curves, stride_row, p_state, o_e, cool_temp_c, fastest_clock_mhz,
                                          max_memory_pressure, N_CLOCK, N_PRESSURE)

    # marginal cost against the load the other tokens put on each expert
    b_others = b_loads.to(tl.float32)
    if SELF_IN_LOADS:
        b_others = tl.maximum(b_others - 1.0, 0.0)
    e_hi, l_hi = stretched_cost(p_curves, stride_row, b_others + 1.0, b_stretch, idle_power_w, N_TABLE)
    e_lo, l_lo = stretched_cost(p_curves, stride_row, tl.maximum(b_others, 1.0), b_stretch, idle_power_w, N_TABLE)
    b_busy = b_others > 0
    b_energy = tl.where(b_busy, e_hi - e_lo, e_hi)
    b_latency = tl.where(b_busy, l_hi - l_lo, l_hi)
    if HAS_EXTRA:  # [2, E]: each routed token's energy and latency beyond the expert's compute,
        # scored against a token's marginal compute at the mean load of the busy experts
        busy_experts = tl.sum(((b_loads > 0) & m_e).to(tl.float32), 0)
        routed = tl.sum(tl.where(m_e, b_loads, 0).to(tl.float32), 0)
        b_mean = tl.maximum(routed / tl.maximum(busy_experts, 1.0), 1.0) + tl.zeros_like(b_others)  # [BINS]
        r_hi_e, r_hi_l = stretched_cost(p_curves, stride_row, b_mean + 1.0, b_stretch, idle_power_w, N_TABLE)
        r_lo_e, r_lo_l = stretched_cost(p_curves, stride_row, b_mean, b_stretch, idle_power_w, N_TABLE)
        b_energy += tl.load(p_extra + o_e, mask=m_e, other=0.0) * fixed_energy_j / \
            tl.maximum(r_hi_e - r_lo_e, MARGINAL_FLOOR_CONSTEXPR * fixed_energy_j)
        b_latency += tl.load(p_extra + E + o_e, mask=m_e, other=0.0) * fixed_latency_ms / \
            tl.maximum(r_hi_l - r_lo_l, MARGINAL_FLOOR_CONSTEXPR * fixed_latency_ms)
    b_score = score(b_energy, b_latency, b_temp, fixed_energy_j, fixed_latency_ms, slowdown_temp_c, energy_weight,
                     latency_weight, thermal_gain, thermal_margin_c)
    b_offsets = tl.load(p_offsets + o_e, mask=m_e, other=0.0)
    b_share = tl.where(b_score == float("inf"), 1.0, b_score / (1.0 + b_score))  # s / (1 + s) saturates at 1
    return clamp(b_offsets - max_shift * b_share, -max_shift, 0.0)

def check_cost_inputs(curves: CostCurves, hardware_state: torch.Tensor, bias_offsets: torch.Tensor,
                      **inputs: torch.Tensor) -> None:
    check_tensor("hardware_state", hardware_state, ndim=1, dtypes=(torch.float32,), kernel_device=False)
    check_tensor("bias_offsets", bias_offsets, ndim=1, dtypes=(torch.float32,))
    if not isinstance(curves, CostCurves):
        raise TypeError(f"curves must be CostCurves (from cost_curves), got {type(curves).__name__}")
    if hardware_state.shape[0] != 3:
        raise ValueError(f"hardware_state must be [3] (temp_c, power_w, memory utilisation), got "
                         f"{tuple(hardware_state.shape)}")
    if bias_offsets.shape[0] == 0:
        raise ValueError("bias_offsets must hold one offset per expert, got an empty tensor")
    for name, t in (("hardware_state", hardware_state), ("bias_offsets", bias_offsets)):
        if t.stride(0) != 1:  # read (and bias_offsets written in place) with unit stride
            raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    tensors = inputs | {"bias_offsets": bias_offsets, "curves.packed": curves.packed}
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"all on one device, got {({k: str(t.device) for k, t in tensors.items()})}")
    if not readable_in_place(hardware_state, curves.packed.device):
        raise ValueError(f"hardware_state is on {hardware_state.device} but the kernels run on {curves.packed.device}: "
                         "it must be there, or in pinned host memory that this Triton can read in place "
                         "(kernels.pinned_state.device_reads_pinned)")


def check_extra_cost(extra_cost: torch.Tensor | None, bias_offsets: torch.Tensor) -> torch.Tensor:
    """The optional [2, E] contiguous float32 extra cost (energy J, latency ms per routed token); the
    tensor the kernels read (or a stand-in)."""
    if extra_cost is None:
        return bias_offsets  # never read: HAS_EXTRA is off
    check_tensor("extra_cost", extra_cost, ndim=2, dtypes=(torch.float32,))
    if tuple(extra_cost.shape) != (2, bias_offsets.shape[0]) or not extra_cost.is_contiguous():
        raise ValueError(f"extra_cost must be a contiguous [2, {bias_offsets.shape[0]}] tensor (energy_j, latency_ms "
                         f"per routed token), got {tuple(extra_cost.shape)}")
    return extra_cost


def cost_constants(curves: CostCurves, energy_weight: float, latency_weight: float, max_shift: float,
                   thermal_gain: float, thermal_margin_c: float, max_memory_pressure: float) -> tuple[float, ...]:
    knobs = {"energy_weight": energy_weight, "latency_weight": latency_weight, "max_shift": max_shift,
             "thermal_gain": thermal_gain, "thermal_margin_c": thermal_margin_c,
             "max_memory_pressure": max_memory_pressure}
    for name, value in knobs.items():
        check_knob(name, value)
    if thermal_margin_c == 0:
        raise ValueError("thermal_margin_c must be > 0")
    return (curves.idle_power_w, curves.fixed_energy_j, curves.fixed_latency_ms, curves.cool_temp_c,
            curves.slowdown_temp_c, curves.fastest_clock_mhz, float(energy_weight), float(latency_weight),
            float(max_shift), float(thermal_gain), float(thermal_margin_c), float(max_memory_pressure))


def check_knob(name: str, value: object, positive: bool = False) -> None:
    """A number the kernel takes as a float32 scalar: finite there (<= 3.4e38), and >= 0 (or > 0)."""
    check_float(name, value, low=0.0, high=FLOAT32_MAX, low_open=positive)

def lerp_segments_reference(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``lerp`` in torch: piecewise-linear ys(x) through sorted ``xs``, extending the end segments."""
    flat = x.reshape(-1)  # a 0-d index tensor would index like a Python int: a host sync
    hi = (xs.unsqueeze(0) <= flat.unsqueeze(1)).sum(-1).clamp(1, xs.numel() - 1)
    t = (flat - xs[hi - 1]) / (xs[hi] - xs[hi - 1])
    return (ys[hi - 1] + t * (ys[hi] - ys[hi - 1])).reshape(x.shape)


def state_on_table_device(curves: CostCurves, hardware_state: torch.Tensor) -> torch.Tensor:
    """The state where the references compute: a pinned host state (read in place by the kernels) is copied."""
    return hardware_state.to(curves.packed.device, non_blocking=True)


def hardware_stretch_reference(curves: CostCurves, hardware_state: torch.Tensor,
                               max_memory_pressure: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = dict(zip(ROWS, curves.packed))
    hardware_state = state_on_table_device(curves, hardware_state)
    temp = hardware_state[0].nan_to_num(nan=curves.cool_temp_c).reshape(1)
    pressure = hardware_state[2].nan_to_num(nan=0.0).clamp(0.0, max_memory_pressure).reshape(1)
    n = curves.n_pressure
    stretch = lerp_segments_reference(rows["pressure"][:n], rows["pressure_stretch"][:n], pressure)
    if curves.n_clock > 1:
        temps, clocks = rows["temp_c"][:curves.n_clock], rows["sm_clock_mhz"][:curves.n_clock]
        stretch = stretch * clocks.max() / lerp_segments_reference(temps, clocks, temp.clamp(temps[0], temps[-1]))
    return temp, stretch


def cost_reference(curves: CostCurves, batch: torch.Tensor, stretch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = {k: v[:curves.n_table] for k, v in zip(ROWS, curves.packed)}
    log_b = batch.log()
    energy = lerp_segments_reference(rows["log_batch"], rows["log_energy"], log_b).exp()
    latency = lerp_segments_reference(rows["log_batch"], rows["log_latency"], log_b).exp()
    return energy + curves.idle_power_w * latency * 1e-3 * (stretch - 1.0), latency * stretch


def thermal_rise_reference(curves: CostCurves, temp: torch.Tensor, thermal_gain: float,
                           thermal_margin_c: float) -> torch.Tensor:
    """g(T), the energy weight's factor (1 without a known slowdown threshold)."""
    ramp = ((temp - curves.slowdown_temp_c) / thermal_margin_c + 1.0).clamp(0.0, 1.0).nan_to_num(nan=0.0)
    return 1.0 + thermal_gain * ramp


def score_reference(curves: CostCurves, energy_j: torch.Tensor, latency_ms: torch.Tensor, temp: torch.Tensor,
                    energy_weight: float, latency_weight: float, thermal_gain: float,
                    thermal_margin_c: float) -> torch.Tensor:
    score = energy_weight * thermal_rise_reference(curves, temp, thermal_gain, thermal_margin_c) * energy_j
    score = score / curves.fixed_energy_j
    return (score + latency_weight * latency_ms / curves.fixed_latency_ms).clamp_min(0.0)


def expert_cost_reference(curves: CostCurves, hardware_state: torch.Tensor, batch_sizes: torch.Tensor,
                          max_memory_pressure: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy_j, latency_ms) of one expert at ``batch_sizes`` tokens under ``hardware_state``, as
    the kernels see it (torch; no host sync)."""
    _, stretch = hardware_stretch_reference(curves, hardware_state, max_memory_pressure)
    return cost_reference(curves, batch_sizes.float(), stretch)


def energy_weight_reference(curves: CostCurves, hardware_state: torch.Tensor, energy_weight: float,
                            thermal_gain: float = 1.0, thermal_margin_c: float = 15.0) -> torch.Tensor:
    """w_energy * g(T) at ``hardware_state``'s temperature, as the kernels apply it: a [1] tensor."""
    temp = state_on_table_device(curves, hardware_state)[0].nan_to_num(nan=curves.cool_temp_c).reshape(1)
    return energy_weight * thermal_rise_reference(curves, temp, thermal_gain, thermal_margin_c)

def bias_from_loads_reference(loads: torch.Tensor, curves: CostCurves, hardware_state: torch.Tensor,
                              bias_offsets: torch.Tensor, *, energy_weight: float, latency_weight: float,
                              max_shift: float, thermal_gain: float, thermal_margin_c: float,
                              max_memory_pressure: float, extra_cost: torch.Tensor | None,
                              self_in_loads: bool) -> torch.Tensor:
    """The bias from the experts' loads [E] float32 (``bias_from_loads`` in torch)."""
    temp, stretch = hardware_stretch_reference(curves, hardware_state, max_memory_pressure)
    others = (loads - 1.0).clamp_min(0.0) if self_in_loads else loads
    (e_hi, l_hi), (e_lo, l_lo) = cost_reference(curves, others + 1.0, stretch), \
        cost_reference(curves, others.clamp_min(1.0), stretch)
    busy = others > 0
    energy, latency = torch.where(busy, e_hi - e_lo, e_hi), torch.where(busy, l_hi - l_lo, l_hi)
    if extra_cost is not None:
        mean = (loads.sum() / (loads > 0).sum().clamp_min(1)).clamp_min(1.0).reshape(1)
        (r_hi_e, r_hi_l), (r_lo_e, r_lo_l) = cost_reference(curves, mean + 1.0, stretch), \
            cost_reference(curves, mean, stretch)
        energy = energy + extra_cost[0] * curves.fixed_energy_j / \
            (r_hi_e - r_lo_e).clamp_min(MARGINAL_FLOOR * curves.fixed_energy_j)
        latency = latency + extra_cost[1] * curves.fixed_latency_ms / \
            (r_hi_l - r_lo_l).clamp_min(MARGINAL_FLOOR * curves.fixed_latency_ms)
    score = score_reference(curves, energy, latency, temp, energy_weight, latency_weight, thermal_gain,
                             thermal_margin_c)
    share = torch.where(score == math.inf, 1.0, score / (1.0 + score))
    return (bias_offsets - max_shift * share).clamp(-max_shift, 0.0)
