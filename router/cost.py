"""The energy-aware router's cost part: each expert's selection bias from measured costs.

At decode sizes an expert's cost is mostly loading its weights, paid once per
batch. Plain top-k gives each expert a load n (tokens routed to it). A token deciding about an
expert sees the load m the *other* tokens put on it (m = n - 1 for an expert the token already
picked, so a singleton expert costs its only token the full weight load). Its marginal cost is
cost(1) for m = 0 (idle: the fixed weight load) and cost(m + 1) - cost(m) for m > 0 (the
per-token cost), where cost(b) is the table op ``swiglu_ffn`` (one expert's SwiGLU FFN at b
tokens), looked up on the device at the live temperature and memory pressure. Normalised by the
fixed costs E1 = energy(1), L1 = latency(1) (unstretched, so heat and pressure show up as a
larger cost), each expert's cost score is

    c_e = w_energy * g(T) * dE_e / E1 + w_latency * dL_e / L1

and its selection bias is ``clamp(-delta * c_e / (1 + c_e) + offset_e, -delta, 0)``: an idle or
singleton expert's c is about w_energy (bias about -delta / 2 at w_energy = 1), a busy expert's
about its per-token share (a few %, bias near 0). The routing kernel adds the bias to the
softmax probabilities for *selection only*; gate weights stay the unbiased probabilities.

**The quality knob.** ``delta = 1 / quality`` is the largest router-probability gap a re-route
may cross: because every bias lies in [-delta, 0], a token drops an expert a for an expert b only
if p_a - p_b <= delta. quality = 10 keeps every swap within 0.1 of probability; larger is closer
to plain top-k. ``quality`` must be > 0 when a cost weight is set. With energy and latency weights
both 0 (and no gate adaptation) the output is exactly plain ``TopKRouter`` routing.

**Hardware state.** A ``router.monitor.HardwareMonitor`` caches NVML readings on its own thread;
the routing kernels read its pinned [3] buffer in place (``kernels.pinned_state``: no copy, and a
CUDA-graph replay sees the live reading) and never call NVML. Where this Triton cannot read pinned
memory (probed once per device) the forward copies the buffer to the device instead (non-blocking,
re-read at every replay). The energy weight rises toward the GPU's NVML
slowdown threshold T_slow (the table's, else the meter's): g(T) = 1 + thermal_gain *
clamp((T - (T_slow - thermal_margin_c)) / thermal_margin_c, 0, 1), on the device; without a known
threshold g = 1. Memory-bandwidth utilisation (clamped to ``max_memory_pressure``) is the cost
lookup's memory pressure. Until the first reading the temperature is the table's coolest
calibrated point and the pressure 0.
"""
import dataclasses
import math
import warnings

import torch

from costmodel.kernel_cost_model import KernelCostModel
from kernels.cost_bias import cost_curves, energy_weight_reference, expert_cost_bias, expert_cost_reference
from kernels.pinned_state import readable_in_place
from kernels.validate import check_int, check_same_device, check_tensor

COST_OP = "swiglu_ffn"
# the table op that costs one expert, by the experts' weight dtype (``FusedMoE.quantize_fp8`` makes FP8 ones)
EXPERT_COST_OPS = {"bf16": COST_OP, "fp8": "expert_ffn_fp8"}


class CostSelection:
    """The cost part of ``router.EnergyAwareTTTRouter`` (a mixin: its state lives on the router).

    Needs ``objective_weights``, ``kernel_cost_model``, ``monitor``, ``slowdown_temp_c``,
    ``thermal_gain``, ``thermal_margin_c``, ``max_memory_pressure``, ``_extra_cost_host`` and the
    ``bias_offsets`` / ``hardware_state`` buffers."""

    @property
    def cost_weighted(self) -> bool:
        """Does any cost weight move the selection (False: exactly plain top-k)?"""
        return self.objective_weights["energy"] > 0 or self.objective_weights["latency"] > 0

    @property
    def max_shift(self) -> float:
        """delta: the largest probability gap a re-route may cross (1 / quality)."""
        return 1.0 / self.objective_weights["quality"] if self.cost_weighted else 0.0

    @property
    def monitoring(self) -> bool:
        return self.monitor is not None and self.monitor.available

    def _device_tables(self):
        """The bias kernels' cost curves and the placement's extra cost, on the weight's device."""
        device = self.weight.device
        curves = cost_curves(self.kernel_cost_model.device_curves(self.cost_op), device)
        if self.slowdown_temp_c is not None:  # the table's, else the monitor's (NVML) threshold
            curves = dataclasses.replace(curves, slowdown_temp_c=float(self.slowdown_temp_c))
        self._curves = curves
        # [2, E] energy_j, latency_ms per routed token beyond compute (None: no placement)
        self.extra_cost = None if self._extra_cost_host is None else self._extra_cost_host.to(device)
        self._no_state = torch.full((3,), math.nan, device=device)  # no monitor: cost model alone
        self._reads_host_state = self.monitoring and readable_in_place(self.monitor.host_state, device)

    def expert_cost(self, batch_sizes: torch.Tensor) -> tuple:
        """(energy_j, latency_ms) of one expert at ``batch_sizes`` tokens (a float tensor) under the
        cached hardware state, as the bias kernels see it."""
        check_tensor("batch_sizes", batch_sizes, dtypes=None, kernel_device=False)
        check_same_device(batch_sizes=batch_sizes, weight=self.weight)
        return expert_cost_reference(self._curves, self._state(), batch_sizes, self.max_memory_pressure)

    def energy_weight(self) -> torch.Tensor:
        """w_energy * g(T) at the cached temperature, as the bias kernels apply it (a [1] device tensor)."""
        return energy_weight_reference(self._curves, self._state(), self.objective_weights["energy"],
                                       self.thermal_gain, self.thermal_margin_c)

    def _state(self):
        """The [3] state the kernels read: the monitor's buffer in place, its copy, or NaNs (no monitor)."""
        if not self.monitoring:
            return self._no_state
        return self.monitor.host_state if self._reads_host_state else self.hardware_state

    def cost_bias(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The [E] selection bias for a batch whose plain top-k chose ``topk_ids`` [T, K]: one
        launch of ``kernels.cost_bias.expert_cost_bias`` (which checks them) on the cached hardware state."""
        return expert_cost_bias(topk_ids, self._curves, self._state(), self.bias_offsets, **self._bias_knobs())

    def _bias_knobs(self):
        return {"energy_weight": self.objective_weights["energy"], "latency_weight": self.objective_weights["latency"],
                "max_shift": self.max_shift, "thermal_gain": self.thermal_gain,
                "thermal_margin_c": self.thermal_margin_c, "max_memory_pressure": self.max_memory_pressure,
                "extra_cost": self.extra_cost}


def cost_model_at(model: KernelCostModel, d_model: int, cost_op: str = COST_OP) -> KernelCostModel:
    """``model`` costing experts of ``d_model`` with ``cost_op``: as given when its dims have that
    d_model, else at d_model with its d_ff scaled alike (the tile model carries the table there; a
    warning says how to give the experts' real d_ff)."""
    if not isinstance(model, KernelCostModel):
        raise TypeError(f"kernel_cost_model must be a costmodel.KernelCostModel (e.g. KernelCostModel('H100')), "
                        f"got {type(model).__name__}")
    d_model = check_int("d_model", d_model, 1)
    if cost_op not in model.ops:
        raise ValueError(f"kernel_cost_model has no {cost_op!r} op (one expert's FFN), which the router's "
                         f"cost bias reads; its table has {list(model.ops)}"
                         + ("; `python -m bench.calibrate --ops expert_ffn_fp8` adds it" if cost_op != COST_OP else ""))
    if model.dims.d_model == d_model:
        return model
    d_ff = max(1, round(model.dims.d_ff * d_model / model.dims.d_model))
    n_heads = model.dims.n_heads if d_model % model.dims.n_heads == 0 else 1  # unused by the expert's cost
    warnings.warn(f"kernel_cost_model is at d_model={model.dims.d_model}; the router costs its experts at "
                  f"d_model={d_model}, d_ff={d_ff} (scaled alike, modelled). For the experts' real size pass "
                  f"kernel_cost_model.with_dims(d_model={d_model}, d_ff=<their intermediate size>)", UserWarning,
                  stacklevel=3)
    return model.with_dims(d_model=d_model, d_ff=d_ff, n_heads=n_heads)
