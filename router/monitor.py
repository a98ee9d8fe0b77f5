"""``HardwareMonitor``: the GPU's temperature, power and memory-bandwidth use, cached for hot paths.

A ``calibration.nvml_meter.BackgroundSampler`` reads NVML at 10 Hz or slower on its own thread;
each reading updates host floats and ``host_state``, a [3] float32 CPU tensor (pinned where CUDA
exists) holding ``[temperature_c, power_w, memory_bandwidth_util]`` (util in 0..1, NaN while
unknown). The routers' kernels read the pinned ``host_state`` in place (``kernels.pinned_state``),
so a replaying CUDA graph sees live readings with no copy; where that is not possible they copy it
to their device with ``non_blocking=True`` (never blocking the host; a captured copy re-reads the
buffer at every replay). The thread itself makes no CUDA calls (one could break another thread's
graph capture). It may rewrite the buffer while a kernel or copy reads it, which can then mix two
readings' fields: harmless for a 10 Hz state.

A reading NVML does not give, or one that is physically impossible (a temperature at or below
absolute zero or above ``MAX_GPU_TEMP_C``, a power below 0 W or above ``MAX_BOARD_POWER_W``, a
utilisation outside 0..100 %), is never cached: that field keeps its last good value (unknown,
NaN in ``host_state``, if it never had one). A non-finite temperature counts in
``nan_temperature_readings``, every other rejected figure in ``impossible_readings``, and each
rejection warns. NVML thresholds outside that temperature range, or a slowdown threshold above the
shutdown one, leave ``slowdown_temp_c`` unknown (None), with a warning. Without NVML every figure
stays unknown and routers run on the cost model alone; ``warn_unavailable`` says so once per monitor.
"""
import math
import numbers
import threading
import warnings
from collections import deque

import torch

from calibration.nvml_meter import MIN_SAMPLE_INTERVAL_S, BackgroundSampler, GpuMeter, GpuReading, check_interval_s
from calibration.validate import check_meter
from costmodel.validate import ABSOLUTE_ZERO_C, MAX_BOARD_POWER_W, MAX_GPU_TEMP_C, count

STATE_FIELDS = ("temperature_c", "power_w", "memory_bandwidth_util")
METER_CALLS = ("available", "unavailable_reason", "temperature_thresholds_c")


class _TappedMeter:
    """The meter as the sampler sees it: every reading also goes to the monitor's cache."""

    def __init__(self, meter, ingest):
        self.meter, self.ingest = meter, ingest

    def read(self) -> GpuReading:
        reading = self.meter.read()
        self.ingest(reading)
        return reading


class HardwareMonitor:
    """Cached NVML state of one GPU, refreshed every ``interval_s`` (>= 0.1 s) while started; readings
    NVML does not give or that are physically impossible are never cached (see the module's docstring).

    Args:
        meter: a ``GpuMeter`` (default: one for ``device``'s index; tests pass a fake-NVML meter).
        interval_s: sampling period, a finite number of seconds >= ``MIN_SAMPLE_INTERVAL_S`` (NVML
            updates ~every 100 ms).
        device: the CUDA device whose NVML index to read (default: the current one, or 0); only
            without ``meter``.
        history: readings kept in ``samples``, an int >= 0 (a bounded timeline: a server's monitor
            must not grow; 0 keeps none).
    Use ``with monitor:`` (or ``start``/``stop``); ``poll()`` takes one reading now.
    """

    def __init__(self, meter: "GpuMeter | None" = None, interval_s: float = MIN_SAMPLE_INTERVAL_S, device=None,
                 history: int = 600):
        if meter is not None and device is not None:
            raise ValueError("give meter or device, not both: device only picks the default meter's GPU")
        self.meter = check_meter("meter", meter, *METER_CALLS) if meter is not None else \
            GpuMeter(_device_index(device))
        interval_s, history = check_interval_s(interval_s), count("history", history, low=0)
        self.temperature_c = self.power_w = self.memory_bandwidth_util = None
        self.nan_temperature_readings = 0
        self.impossible_readings = dict.fromkeys(STATE_FIELDS, 0)
        state = torch.full((len(STATE_FIELDS),), math.nan, dtype=torch.float32)
        self.host_state = state.pin_memory() if torch.cuda.is_available() else state
        self.slowdown_temp_c = _slowdown_temp_c(self.meter.temperature_thresholds_c()) if self.available else None
        self._sampler = BackgroundSampler(_TappedMeter(self.meter, self._ingest), interval_s)
        self._sampler.samples = deque(maxlen=history)
        self._lock = threading.Lock()
        self._warned_unavailable = False
        if self.available:
            self.poll()

    @property
    def available(self) -> bool:
        return self.meter.available

    @property
    def unavailable_reason(self) -> "str | None":
        return self.meter.unavailable_reason

    @property
    def samples(self) -> list:
        return self._sampler.samples

    def poll(self) -> GpuReading:
        """Read the meter once now and cache the reading (what the sampler thread does)."""
        return _TappedMeter(self.meter, self._ingest).read()

    def warn_unavailable(self) -> None:
        """Warn, once per monitor, that routing runs on the cost model alone (no NVML)."""
        if not self.available and not self._warned_unavailable:
            self._warned_unavailable = True
            warnings.warn(f"no GPU hardware state ({self.unavailable_reason}): the router runs on the "
                          "cost model alone (no temperature or memory-pressure terms)", RuntimeWarning, stacklevel=3)

    def start(self) -> "HardwareMonitor":
        """Start the sampler thread (also as a context manager)."""
        self._sampler.start()
        return self

    def stop(self) -> None:
        """Stop the sampler thread."""
        self._sampler.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _ingest(self, reading):
        with self._lock:  # the sampler thread and poll() may both ingest
            self._ingest_temperature(reading.temperature_c)
            power_w = reading.power_average_w if reading.power_average_w is not None else reading.power_instant_w
            self._ingest_field("power_w", power_w, 0.0, MAX_BOARD_POWER_W, "W")
            self._ingest_field("memory_bandwidth_util", reading.memory_bandwidth_util_pct, 0.0, 100.0, "%", scale=0.01)
            self.host_state.copy_(torch.tensor([_or_nan(getattr(self, f)) for f in STATE_FIELDS]))

    def _ingest_temperature(self, temperature_c):
        if temperature_c is None:
            return
        if _is_number(temperature_c) and not math.isfinite(temperature_c):
            self.nan_temperature_readings += 1
            warnings.warn(f"NVML gave a non-finite temperature ({temperature_c}); ignored, keeping the last good "
                          f"reading ({self.temperature_c} °C)", RuntimeWarning, stacklevel=2)
        elif _is_number(temperature_c) and _possible_temp_c(temperature_c):
            self.temperature_c = float(temperature_c)
        else:
            self._reject("temperature_c", temperature_c, "°C", f"outside ({ABSOLUTE_ZERO_C}, {MAX_GPU_TEMP_C:g}]")

    def _ingest_field(self, name, value, low, high, unit, scale=1.0):
        """Cache ``value * scale`` as ``name`` if ``value`` (None: NVML gave none) is a number in [low, high]."""
        if value is None:
            return
        if _is_number(value) and low <= value <= high:
            setattr(self, name, float(value) * scale)
        else:
            self._reject(name, value, unit, f"outside [{low:g}, {high:g}]")

    def _reject(self, name, value, unit, rule):
        self.impossible_readings[name] += 1
        warnings.warn(f"NVML gave an impossible {name} ({value!r} {unit}, {rule}); ignored, keeping the last good "
                      f"reading ({getattr(self, name)})", RuntimeWarning, stacklevel=2)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _possible_temp_c(value):
    return ABSOLUTE_ZERO_C < value <= MAX_GPU_TEMP_C


def _slowdown_temp_c(thresholds):
    """NVML's slowdown threshold (°C), or None when NVML gives none or an impossible one (outside the
    possible temperatures, or above the shutdown threshold), with a warning."""
    slowdown_c, shutdown_c = thresholds.get("slowdown"), thresholds.get("shutdown")
    if slowdown_c is None:
        return None
    impossible = [c for c in (slowdown_c, shutdown_c) if c is not None and not (_is_number(c) and _possible_temp_c(c))]
    if impossible or (shutdown_c is not None and slowdown_c > shutdown_c):
        warnings.warn(f"NVML gave impossible temperature thresholds (slowdown {slowdown_c!r} °C, shutdown "
                      f"{shutdown_c!r} °C; each must be in ({ABSOLUTE_ZERO_C}, {MAX_GPU_TEMP_C:g}] and slowdown <= "
                      "shutdown); the slowdown threshold is unknown", RuntimeWarning, stacklevel=2)
        return None
    return slowdown_c


def _or_nan(value):
    return math.nan if value is None else float(value)


def _device_index(device):
    """The index of CUDA ``device`` (default: the current device, or 0 without CUDA)."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"device must be a CUDA device such as 'cuda:0', got {device!r}") from None
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device such as 'cuda:0', got {device}")
    index = None if device is None else device.index
    if index is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    return index
