"""``DeviceCostTable``: a ``KernelCostModel``'s curves as device tensors, for hot paths.

It interpolates the same knots as ``KernelCostModel.get_cost`` (``KernelCostModel.device_curves``)
with torch ops only, so a prediction never syncs the host and a CUDA graph can capture it.
"""
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import work

if TYPE_CHECKING:  # torch is imported where a table goes to a device, not with the cost model
    import torch
from costmodel.validate import ABSOLUTE_ZERO_C

__all__ = ["DeviceCostTable", "lerp_segments"]


class DeviceCostTable:
    """The table as device tensors, for hot paths: the host API's predictions with torch ops only
    (no host sync, CUDA-graph capturable), including the thermal and memory-pressure stretches.

    Args:
        model: a ``KernelCostModel``, at the dims to cost (``KernelCostModel.with_dims``).
        ops: the ops to carry (their names are resolved here, never in the hot path).
        device: where the tensors live.
    """

    def __init__(self, model: KernelCostModel, ops: Sequence[str], device):
        import torch
        if not isinstance(model, KernelCostModel):
            raise TypeError(f"model must be a KernelCostModel, got {type(model).__name__}")
        if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
            raise TypeError(f"ops must be a list of op names, got {ops!r}")
        self.torch, self.model = torch, model
        self.source = model.table["source"]
        self.idle_power_w = model.table["idle_power_w"]
        self._rows, self._pressure = {}, {}
        for op in ops:
            curves = model.device_curves(op)
            cols = [[math.log(v) for v in curves[k]] for k in ("batch_size", "energy_j", "latency_ms")]
            self._rows[op] = torch.tensor(cols, dtype=torch.float32, device=device)  # [3, n]
            curve = model.pressure_curve(op)  # measured only: the roofline stretch is computed per batch size
            if curve is not None:
                self._pressure[op] = torch.tensor(curve, dtype=torch.float32, device=device).T  # [2, n]
        clock = model.clock_curve()
        self._clocks = torch.tensor(clock, dtype=torch.float32, device=device).T if clock else None  # [2, n]

    def predict(self, op: str, batch_sizes: "torch.Tensor", temp_c: "torch.Tensor | None" = None,
                memory_pressure: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
        """(energy_j, latency_ms) tensors shaped like ``batch_sizes`` (a float tensor, > 0).

        ``temp_c`` and ``memory_pressure`` are optional 0-d (or broadcastable) float tensors on
        the device: the card's temperature (°C) and NVML memory utilisation (0..1), as in ``get_cost``.
        Their values are not checked on the host (that would sync): a batch size <= 0, a
        temperature at or below absolute zero and a pressure outside [0, 1] give NaN, as does a
        pressure of 1 on the roofline fallback (no bandwidth left: no finite time)."""
        torch = self.torch
        self._check_predict(op, batch_sizes, temp_c, memory_pressure)
        row = self._rows[op]
        batch_sizes = torch.where(batch_sizes > 0, batch_sizes.to(torch.float32), math.nan)
        log_b = torch.log(batch_sizes)
        energy = torch.exp(lerp_segments(row[0], row[1], log_b))
        latency = torch.exp(lerp_segments(row[0], row[2], log_b))
        stretch = torch.ones_like(latency)
        if temp_c is not None:
            temp_c = temp_c.to(torch.float32)
            stretch = torch.where(temp_c > ABSOLUTE_ZERO_C, stretch, math.nan)
        if temp_c is not None and self._clocks is not None:
            temps, clocks = self._clocks
            held = temp_c.clamp(temps[0], temps[-1])  # beyond: the hottest clock seen
            clock = lerp_segments(temps, clocks, held) if temps.numel() > 1 else clocks[0]
            stretch = stretch * (clocks.max() / clock)
        if memory_pressure is not None:
            pressure = memory_pressure.to(torch.float32)
            pressure = torch.where((pressure >= 0) & (pressure <= 1), pressure, math.nan)
            stretch = stretch * self._pressure_stretch(op, batch_sizes, pressure)
        # the stretched time costs static (idle) power, as in get_cost
        energy = energy + self.idle_power_w * latency * 1e-3 * (stretch - 1.0)
        return energy, latency * stretch

    def _check_predict(self, op, batch_sizes, temp_c, memory_pressure):
        """Host checks of what ``predict`` was given: kinds and devices only (values stay on the device)."""
        if op not in self._rows:
            raise ValueError(f"op {op!r} is not carried by this DeviceCostTable; it carries {sorted(self._rows)}")
        device = self._rows[op].device
        for name, value in (("batch_sizes", batch_sizes), ("temp_c", temp_c), ("memory_pressure", memory_pressure)):
            if value is None and name != "batch_sizes":
                continue
            if not isinstance(value, self.torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {type(value).__name__}"
                                f"{'' if not isinstance(value, self.torch.Tensor) else ' of ' + str(value.dtype)}")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device}, the table on {device}")

    def _pressure_stretch(self, op, batch_sizes, pressure):
        if op in self._pressure:
            util, stretch = self._pressure[op]
            return lerp_segments(util, stretch, pressure).clamp_min(1.0)  # never faster under pressure
        flops, nbytes = work(op, batch_sizes.to(self.torch.float64), self.model.dims)  # the roofline fallback
        compute_s = (flops / self.model.table["peak_flops"]).float()
        memory_s = (nbytes / self.model.table["hbm_bytes_per_s"]).float()
        free = self.torch.where(pressure < 1, 1.0 - pressure, math.nan)
        return compute_s.maximum(memory_s / free) / compute_s.maximum(memory_s)


def lerp_segments(xs: "torch.Tensor", ys: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
    """Piecewise-linear ys(x) through sorted ``xs`` (device tensors), extending the end segments."""
    flat = x.reshape(-1)  # a 0-d index tensor would index like a Python int: a host sync
    hi = (xs.unsqueeze(0) <= flat.unsqueeze(1)).sum(-1).clamp(1, xs.numel() - 1)
    lo = hi - 1
    t = (flat - xs[lo]) / (xs[hi] - xs[lo])
    return (ys[lo] + t * (ys[hi] - ys[lo])).reshape(x.shape)
