"""``KernelCostModel``: predicted energy and latency of each op at any shape, from a per-GPU table.

Tables are looked up by GPU name in the user's table folder (where ``python -m bench.calibrate``
writes: ``$ENERGY_MOE_TABLES``, else ``~/.cache/energy-moe/tables``), then among the packaged
``calibration/tables/<gpu>.json``: measured ones and analytic priors (``"source": "prior"``).
A tile model of our kernels, fitted to the table's points, carries the costs to any dims and
batch size; at a shape the table measured the costs pass through its points
(``costmodel.curves``). Every figure it returns is a prediction, and ``source`` says what it
rests on: measured (a table point), interpolated or extrapolated (a measured shape, between or
beyond its batch sizes), modelled (a shape the table never measured) or prior.

A table's optional ``collectives`` section holds measured collective curves, written by
``torchrun --nproc_per_node N -m bench.calibrate_comm``: ``collectives[op][str(world_size)]`` is
``{"points": [{"bytes_per_rank", "latency_ms", "energy_j", ...}], "source": "measured", ...}``,
energy summed over the participating GPUs. ``get_comm_cost`` and ``comm_cost_per_byte`` read it.
"""
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields

from costmodel.comm import comm_curves, interpolate_comm, piecewise_linear, secant_slope
from costmodel.curves import ShapeModel
from costmodel.ops import COMM_OPS, FP8_OPS, ModelDims, check_op, work
from costmodel.table import TABLE_DIR, load_table
from costmodel.validate import ABSOLUTE_ZERO_C, count, finite_number, real

PRESSURE_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the roofline stretch's knots on a device

__all__ = ["KernelCostModel", "TABLE_DIR", "checked_dims", "load_table"]

DEFAULT_GPU = "H100"  # the seed API's KernelCostModel()
_NOT_GIVEN = object()


def checked_dims(dims: "ModelDims | dict | None", default: ModelDims = None) -> ModelDims:
    """``dims`` as a ``ModelDims`` (from a ``ModelDims`` or a dict of its fields); None: ``default``."""
    if dims is None:
        return default
    if isinstance(dims, ModelDims):
        return dims
    if not isinstance(dims, dict):
        raise TypeError(f"dims must be a ModelDims or a dict of its fields, got {type(dims).__name__}")
    unknown = sorted(set(dims) - {f.name for f in fields(ModelDims)})
    if unknown:
        raise ValueError(f"dims has unknown fields {unknown}; ModelDims has {[f.name for f in fields(ModelDims)]}")
    try:
        return ModelDims(**dims)
    except ValueError as exc:
        raise ValueError(f"dims: {exc}") from exc


class KernelCostModel:
    """Predicted cost of our kernels on one GPU, from its table.

    Args:
        gpu_type: table name, e.g. ``"H100"`` (the user's ``H100.json`` if there is one, else the
            packaged one; ``costmodel.table.find_table``). Default: ``"H100"``, or with ``table``,
            whatever GPU the table is for.
        table: a path to a table instead (its ``gpu`` field must match ``gpu_type`` when both are given).
        dims: the ``ModelDims`` (or a dict of its fields) that calls without their own ``dims``
            cost; default: the table's. ``with_dims`` makes a copy at other dims.
    """

    def __init__(self, gpu_type: "str | None" = _NOT_GIVEN, table: "str | os.PathLike | None" = None,
                 dims: "ModelDims | dict | None" = None):
        if gpu_type is _NOT_GIVEN:
            gpu_type = None if table is not None else DEFAULT_GPU
        if gpu_type is None and table is None:
            raise ValueError("give gpu_type or table")
        if gpu_type is not None and not isinstance(gpu_type, str):
            raise TypeError(f"gpu_type must be a str such as 'H100', got {type(gpu_type).__name__}")
        if gpu_type is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", gpu_type):
            raise ValueError(f"gpu_type must be a table name such as 'H100' (letters, digits, '_', '-'), "
                             f"got {gpu_type!r}")
        if table is not None and not isinstance(table, (str, os.PathLike)):
            raise TypeError(f"table must be a path (str or os.PathLike), got {type(table).__name__}")
        self.table, self.path = load_table(gpu_type if table is None else None, table)
        if gpu_type is not None and table is not None and self.table.get("gpu") != gpu_type:
            raise ValueError(f"cost table {table} is for GPU {self.table.get('gpu')!r}, not {gpu_type!r}")
        self.gpu_type = self.table["gpu"]
        self.is_prior = self.table["source"] == "prior"
        self.table_dims = ModelDims(**self.table["dims"])
        self.dims = checked_dims(dims, self.table_dims)
        self.shapes = ShapeModel(self.table)
        self._comm = comm_curves(self.table)

    def with_dims(self, dims: "ModelDims | dict | None" = None, **changes: int) -> "KernelCostModel":
        """This model (same table and fit) costing ``dims`` by default, or its dims with ``changes``
        (e.g. ``with_dims(d_model=4096, d_ff=14336)``)."""
        dims = checked_dims(dims, self.dims)
        if changes:
            dims = checked_dims(asdict(dims) | changes)
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, dims=dims)
        return copy

    @property
    def ops(self) -> tuple:
        return tuple(self.table["ops"])

    def is_measured_shape(self, op: str, dims: "ModelDims | dict | None" = None) -> bool:
        """Did the table measure ``op`` at ``dims`` (default: this model's)?"""
        return bool(self.shapes.curve(op, checked_dims(dims, self.dims)).measured_batches)

    def _check(self, op, batch_size, current_temp, memory_pressure):
        """The arguments as Python floats (numpy scalars in, plain numbers out), or an error naming one."""
        check_op(op)
        if op not in self.table["ops"]:
            why = self.table.get("fp8_ops_missing_reason", "") if op in FP8_OPS else ""
            how = f"; `python -m bench.calibrate --gpu {self.gpu_type} --ops {op}` measures it, keeping the other ops"
            raise ValueError(f"op {op!r} is not in the {self.gpu_type} table ({self.path})"
                             + (f": {why}" if why else how))
        batch_size = finite_number("batch_size", batch_size, low=0.0, low_open=True)
        if current_temp is not None:
            current_temp = self._check_temp(current_temp)
        if memory_pressure is not None:
            memory_pressure = real("memory_pressure", memory_pressure)
            if not 0.0 <= memory_pressure <= 1.0:
                raise ValueError(f"memory_pressure must be in [0, 1] or None, got {memory_pressure!r}")
        return batch_size, current_temp, memory_pressure

    def _check_temp(self, current_temp):
        """A card's temperature: above absolute zero, and below the shutdown threshold when the
        table knows it (a card there is off, so such a reading is a bad sensor or a typo)."""
        temp_c = real("current_temp", current_temp)
        shutdown_c = (self.table.get("thermal") or {}).get("shutdown_temp_c")
        if not math.isfinite(temp_c) or temp_c <= ABSOLUTE_ZERO_C:
            raise ValueError(f"current_temp must be a finite °C above absolute zero ({ABSOLUTE_ZERO_C}), "
                             f"got {current_temp!r}")
        if shutdown_c is not None and temp_c >= shutdown_c:
            raise ValueError(f"current_temp {current_temp!r} °C is at or above the {self.gpu_type}'s shutdown "
                             f"threshold ({shutdown_c} °C), where the card powers off")
        return temp_c

    def _base(self, op, batch_size, dims):
        """(latency_ms, energy_j, memory_gb, latency's source, energy's source) from the op's curve."""
        curve = self.shapes.curve(op, dims)
        if self.is_prior:
            return (*curve.at(batch_size), "prior", "prior")
        return (*curve.at(batch_size), _where(curve.measured_batches, batch_size),
                _where(curve.metered_batches, batch_size))

    def pressure_curve(self, op: str) -> "list | None":
        """The measured (background utilisation, latency stretch) points of ``op``, or None. A stretch
        below 1 (timing noise: pressure never shortens a call) counts as 1."""
        section = self.table.get("memory_pressure")
        curve = section["ops"].get(op) if section else None
        if not curve:
            return None
        points = sorted((p["background_util"], max(p["stretch"], 1.0)) for p in curve["points"]
                        if p["background_util"] is not None)
        return points if len(points) >= 2 else None

    def device_curves(self, op: str, dims: "ModelDims | dict | None" = None) -> dict:
        """``op``'s curves at ``dims`` (default: this model's) as plain numbers: what every device
        path (``DeviceCostTable``, the router's bias kernels through ``kernels.cost_bias.cost_curves``)
        interpolates, the same knots ``get_cost`` interpolates.

        Returns a dict: ``batch_size``, ``energy_j``, ``latency_ms`` (the curve's knots,
        ``costmodel.curves``); ``clock`` [(temp_c, sm_clock_mhz)] (the calibrated SM clock against temperature, or
        [(25.0, 1.0)] without one: no stretch); ``pressure`` [(NVML memory utilisation, latency
        stretch)]: the measured curve, or the roofline stretch of one token on ``PRESSURE_GRID``;
        ``idle_power_w``; ``fixed_energy_j``, ``fixed_latency_ms`` (one token, unstretched);
        ``slowdown_temp_c`` (None where unknown)."""
        self._check(op, 1, None, None)  # ValueError naming an op the table lacks
        dims = checked_dims(dims, self.dims)
        curve = self.shapes.curve(op, dims)
        clock = self.clock_curve() or [(25.0, 1.0)]
        pressure = self.pressure_curve(op) or [(u, self._pressure_factor(op, 1, u, dims)[0]) for u in PRESSURE_GRID]
        fixed = self.get_cost(op, 1, dims=dims)
        return {**{k: list(getattr(curve, k)) for k in ("batch_size", "energy_j", "latency_ms")},
                "clock": clock, "pressure": pressure, "idle_power_w": self.table["idle_power_w"],
                "fixed_energy_j": fixed["energy_joules"], "fixed_latency_ms": fixed["latency_ms"],
                "slowdown_temp_c": (self.table.get("thermal") or {}).get("slowdown_temp_c")}

    def clock_curve(self) -> "list | None":
        """The calibrated (temp_c, sm_clock_mhz) points, coolest first, or None without a thermal model."""
        curve = (self.table.get("thermal") or {}).get("clock_vs_temp")
        return [(p["temp_c"], p["sm_clock_mhz"]) for p in curve] if curve else None

    def _pressure_factor(self, op, batch_size, memory_pressure, dims):
        """(latency stretch, extrapolated?) when other work holds ``memory_pressure`` of HBM
        bandwidth (NVML memory utilisation, 0..1). Measured tables interpolate the op's stretch
        curve linearly (beyond the highest measured pressure: its last segment, extrapolated);
        without one, the memory-bound part of the roofline time runs at the remaining bandwidth."""
        if not memory_pressure:
            return 1.0, False
        curve = self.pressure_curve(op)
        if curve is not None:
            return max(piecewise_linear(curve, memory_pressure), 1.0), memory_pressure > curve[-1][0]
        compute_s, memory_s = self._roofline_s(op, batch_size, dims)
        if memory_pressure >= 1.0:
            raise ValueError(f"memory_pressure 1.0 leaves {op} no HBM bandwidth in the roofline model (the {self.gpu_type} "
                             "table has no measured pressure curve for it): the predicted time would be infinite")
        return max(compute_s, memory_s / (1.0 - memory_pressure)) / max(compute_s, memory_s), False

    def _thermal_factor(self, current_temp):
        """(latency stretch from the measured SM clock at ``current_temp``, extrapolated?, warning)."""
        thermal = self.table.get("thermal")
        curve = thermal.get("clock_vs_temp") if thermal else None
        if current_temp is None or not curve:
            return 1.0, False, None
        temps = [p["temp_c"] for p in curve]
        clocks = [p["sm_clock_mhz"] for p in curve]
        fastest = max(clocks)
        if current_temp <= temps[0]:
            return fastest / clocks[0], False, None
        if current_temp <= temps[-1]:
            i = next(n for n, t in enumerate(temps) if t >= current_temp)  # >= 1: hotter than temps[0]
            w = (current_temp - temps[i - 1]) / (temps[i] - temps[i - 1])
            return fastest / (clocks[i - 1] + w * (clocks[i] - clocks[i - 1])), False, None
        slowdown = thermal.get("slowdown_temp_c")
        warning = None
        if slowdown is not None and current_temp >= slowdown:
            warning = (f"{current_temp} °C is at or above the NVML slowdown threshold ({slowdown} °C): the hardware "
                       "slowdown there was never measured and is not modelled")
        return fastest / clocks[-1], True, warning  # held at the hottest measured clock

    def _roofline_s(self, op, batch_size, dims):
        flops, nbytes = work(op, batch_size, dims)
        return flops / self.table["peak_flops"], nbytes / self.table["hbm_bytes_per_s"]

    def _temp_impact_c(self, power_w, latency_ms, current_temp):
        thermal = self.table.get("thermal")
        if not thermal:
            return None
        steady = thermal["ambient_c"] + thermal["resistance_c_per_w"] * power_w
        start = thermal["ambient_c"] + thermal["resistance_c_per_w"] * self.table["idle_power_w"] \
            if current_temp is None else current_temp
        return (steady - start) * (1.0 - math.exp(-latency_ms * 1e-3 / thermal["time_constant_s"]))

    def get_cost(self, op: str, batch_size: float, current_temp: float = None, memory_pressure: float = None,
                 dims: "ModelDims | dict | None" = None) -> dict:
        """Predicted cost of one call of ``op`` at ``batch_size`` (tokens; sequences for attention ops;
        any positive number: a fractional one is a mean load, as the router uses) and ``dims`` (a
        ``ModelDims`` or a dict of its fields; default: this model's).

        Returns a dict: ``energy_joules``, ``latency_ms``, ``power_w``, ``temp_impact`` (°C the call
        raises the card from ``current_temp``; None without a thermal model), ``memory_gb``,
        ``source`` (measured / interpolated / extrapolated / modelled / prior: where the latency comes
        from), ``energy_source`` (the same for the energy: a shape the sweep timed without energy
        windows has measured latencies and modelled energy), ``dims`` and ``prediction: True``.
        A hotter card runs at the SM clock the calibration saw at that temperature (held at the
        hottest one seen beyond it: "extrapolated"); a share of HBM taken by others stretches the
        memory-bound part of the roofline time. Stretched time costs idle power."""
        batch_size, current_temp, memory_pressure = self._check(op, batch_size, current_temp, memory_pressure)
        dims = checked_dims(dims, self.dims)
        latency_ms, energy_j, memory_gb, source, energy_source = self._base(op, batch_size, dims)
        thermal_stretch, thermal_extrapolated, warning = self._thermal_factor(current_temp)
        pressure_stretch, pressure_extrapolated = self._pressure_factor(op, batch_size, memory_pressure, dims)
        if thermal_extrapolated or pressure_extrapolated:
            source, energy_source = (s if s in ("modelled", "prior") else "extrapolated"
                                     for s in (source, energy_source))
        stretch = pressure_stretch * thermal_stretch
        idle_w = self.table["idle_power_w"]
        # the stretched time costs static (idle) power; the dynamic energy of the work is unchanged
        energy_j += idle_w * latency_ms * 1e-3 * (stretch - 1.0)
        latency_ms *= stretch
        power_w = energy_j / (latency_ms * 1e-3)
        cost = {"energy_joules": energy_j, "latency_ms": latency_ms, "power_w": power_w,
                "temp_impact": self._temp_impact_c(power_w, latency_ms, current_temp), "memory_gb": memory_gb,
                "source": source, "energy_source": energy_source, "prediction": True, "gpu": self.gpu_type,
                "dims": asdict(dims)}
        return cost | ({"warning": warning} if warning else {})

    def _comm_curve(self, op, bytes_per_rank, world_size):
        if op not in COMM_OPS:
            raise ValueError(f"unknown collective op {op!r}; the cost model knows {', '.join(COMM_OPS)}")
        finite_number("bytes_per_rank", bytes_per_rank, low=0.0, low_open=True)
        world_size = count("world_size", world_size, 1)
        if not self.table.get("collectives"):
            raise ValueError(f"the {self.gpu_type} table ({self.path}) has no collectives section: "
                             f"torchrun --nproc_per_node N -m bench.calibrate_comm --gpu {self.gpu_type} measures it")
        curve = self._comm.get((op, world_size))
        if curve is None:
            measured = sorted(w for o, w in self._comm if o == op)
            raise ValueError(f"world_size {world_size} has no {op} curve in the {self.gpu_type} table "
                             f"({self.path}); measured world sizes: {measured}; torchrun --nproc_per_node {world_size} "
                             f"-m bench.calibrate_comm --gpu {self.gpu_type} measures it")
        return curve

    def get_comm_cost(self, op: str, bytes_per_rank: float, world_size: int) -> dict:
        """Predicted cost of one collective call in which each of ``world_size`` ranks sends
        ``bytes_per_rank``: ``energy_joules`` (summed over all participating GPUs), ``latency_ms``,
        ``source`` (the curve's: "measured") and ``interpolation`` (measured / interpolated /
        extrapolated). Log-log between measured sizes; beyond them linear in bytes."""
        curve = self._comm_curve(op, bytes_per_rank, world_size)
        latency_ms, where = interpolate_comm(curve["points"], bytes_per_rank, "latency_ms")
        energy_j, _ = interpolate_comm(curve["points"], bytes_per_rank, "energy_j")
        return {"energy_joules": energy_j, "latency_ms": latency_ms, "source": curve["source"],
                "interpolation": where, "prediction": True, "gpu": self.gpu_type}

    def comm_cost_per_byte(self, op: str, bytes_per_rank: float, world_size: int) -> tuple:
        """(energy_j_per_byte, latency_ms_per_byte): the marginal cost of one more byte per rank in a
        message of ``bytes_per_rank``, the secant slope of the measured curve around it (>= 0)."""
        points = self._comm_curve(op, bytes_per_rank, world_size)["points"]
        return secant_slope(points, bytes_per_rank, "energy_j"), secant_slope(points, bytes_per_rank, "latency_ms")

    def get_plan_cost(self, plan: Sequence[tuple], measured_latency_ms: float = None) -> dict:
        """Predicted cost of a sequence of calls, ``plan`` = [(op, batch_size, calls), ...].

        With the sequence's ``measured_latency_ms`` (an eager call: host launch gaps the table does
        not model), the time it took beyond the predicted kernel time is charged at the table's
        ``gap_power_w`` (the awake-but-waiting power; idle power for tables without it). Returns
        ``energy_joules``, ``latency_ms`` (kernel time plus the gaps), ``kernel_latency_ms``,
        ``gap_ms`` and ``prediction: True``."""
        if measured_latency_ms is not None:
            measured_latency_ms = real("measured_latency_ms", measured_latency_ms)
            if not (math.isfinite(measured_latency_ms) and measured_latency_ms >= 0):
                raise ValueError(f"measured_latency_ms must be a finite number >= 0 or None, got {measured_latency_ms!r}")
        if isinstance(plan, (str, dict)) or not hasattr(plan, "__iter__"):
            raise TypeError(f"plan must be a list of (op, batch_size, calls) entries, got {type(plan).__name__}")
        energy_j = latency_ms = 0.0
        for entry in plan:
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise ValueError(f"plan entries must be (op, batch_size, calls), got {entry!r}")
            op, batch_size, calls = entry
            calls = count(f"plan entry ({op!r}, {batch_size!r}, {calls!r}): calls", calls, 0)
            cost = self.get_cost(op, batch_size)
            energy_j += cost["energy_joules"] * calls
            latency_ms += cost["latency_ms"] * calls
        gap_ms = 0.0 if measured_latency_ms is None else max(0.0, measured_latency_ms - latency_ms)
        gap_power_w = self.table.get("gap_power_w") or self.table["idle_power_w"]
        return {"energy_joules": energy_j + gap_power_w * gap_ms * 1e-3, "latency_ms": latency_ms + gap_ms,
                "kernel_latency_ms": latency_ms, "gap_ms": gap_ms, "prediction": True, "gpu": self.gpu_type}

    def get_cost_breakdown(self, op: str, batch_size: float, dims: "ModelDims | dict | None" = None) -> dict:
        """Static vs dynamic energy (idle power over the call's time vs the rest), and compute- vs
        memory-bound time (the roofline's split of the predicted latency)."""
        cost = self.get_cost(op, batch_size, dims=dims)
        static_j = min(self.table["idle_power_w"] * cost["latency_ms"] * 1e-3, cost["energy_joules"])
        compute_s, memory_s = self._roofline_s(op, batch_size, checked_dims(dims, self.dims))
        compute_share = compute_s / (compute_s + memory_s)
        return cost | {"static_energy_joules": static_j, "dynamic_energy_joules": cost["energy_joules"] - static_j,
                       "compute_bound_ms": cost["latency_ms"] * compute_share,
                       "memory_bound_ms": cost["latency_ms"] * (1.0 - compute_share)}

    def get_thermal_safe_batch_size(self, op: str, current_temp: float, max_temp_increase: float) -> "int | None":
        """Largest batch size (powers of two up to the table's largest) whose predicted temperature
        rise from ``current_temp`` stays within ``max_temp_increase`` °C and keeps the card below
        the NVML slowdown threshold (when the table has it); 0 when no batch is safe (e.g. at or
        above the slowdown threshold); None without a thermal model."""
        max_temp_increase = finite_number("max_temp_increase", max_temp_increase, low=0.0, low_open=True)
        if current_temp is None:
            raise TypeError("current_temp must be a number of °C, got NoneType")
        _, current_temp, _ = self._check(op, 1, current_temp, None)
        if not self.table.get("thermal"):
            return None
        slowdown_c = self.table["thermal"].get("slowdown_temp_c")
        if slowdown_c is not None and current_temp >= slowdown_c:  # the hardware is already slowing the card
            warnings.warn(f"current_temp {current_temp} °C is at or above the {self.gpu_type}'s slowdown threshold "
                          f"({slowdown_c} °C): no batch size is thermally safe (0)", RuntimeWarning, stacklevel=2)
            return 0
        largest = max(p["batch_size"] for p in self.table["ops"][op]["points"])
        safe, batch = 0, 1
        while batch <= largest:
            rise_c = self.get_cost(op, batch, current_temp=current_temp)["temp_impact"]
            if rise_c <= max_temp_increase and (slowdown_c is None or current_temp + rise_c < slowdown_c):
                safe = batch
            batch *= 2
        return safe


def _where(measured_batches, batch_size):
    """The source of a cost at ``batch_size`` on a curve measured at ``measured_batches`` (none: modelled)."""
    if not measured_batches:
        return "modelled"
    if batch_size in measured_batches:
        return "measured"
    return "interpolated" if measured_batches[0] < batch_size < measured_batches[-1] else "extrapolated"
