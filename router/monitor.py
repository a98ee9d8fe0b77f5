"""``HardwareMonitor``: the GPU's temperature, power and memory-bandwidth use, cached for hot paths.

A ``calibration.nvml_meter.BackgroundSampler`` reads NVML at 10 Hz or slower on its own thread;
each reading updates host floats and ``host_state``, a [3] float32 CPU tensor (pinned where CUDA
exists) holding ``[temperature_c, power_w, memory_bandwidth_util]`` (util in 0..1, NaN while
unknown). Routers copy ``host_state`` to their device with ``non_blocking=True`` at the start of
their forward: a pinned-memory copy never blocks the host, and inside a CUDA graph the captured
copy re-reads the pinned buffer at every replay, so a replaying graph sees live readings. The
thread itself makes no CUDA calls (one could break another thread's graph capture). The monitor
thread may rewrite the buffer while a copy reads it; a copy can then mix two readings' fields,
which is harmless for a 10 Hz state.

A NaN temperature reading is ignored with a warning (the last good value stays). Without NVML
every figure stays unknown and routers run on the cost model alone; ``warn_unavailable`` says so
once per monitor.
"""
import math
import threading
import warnings
from collections import deque

import torch

from calibration.nvml_meter import MIN_SAMPLE_INTERVAL_S, BackgroundSampler, GpuMeter

STATE_FIELDS = ("temperature_c", "power_w", "memory_bandwidth_util")


class _TappedMeter:
    """The meter as the sampler sees it: every reading also goes to the monitor's cache."""

    def __init__(self, meter, ingest):
        self.meter, self.ingest = meter, ingest

    def read(self):
        reading = self.meter.read()
        self.ingest(reading)
        return reading


class HardwareMonitor:
    """Cached NVML state of one GPU, refreshed every ``interval_s`` (>= 0.1 s) while started.

    Args:
        meter: a ``GpuMeter`` (default: one for ``device``'s index; tests pass a fake-NVML meter).
        interval_s: sampling period, at least ``MIN_SAMPLE_INTERVAL_S`` (NVML updates ~every 100 ms).
        device: the CUDA device whose NVML index to read (default: the current one, or 0).
        history: readings kept in ``samples`` (a bounded timeline: a server's monitor must not grow).
    Use ``with monitor:`` (or ``start``/``stop``); ``poll()`` takes one reading now.
    """

    def __init__(self, meter=None, interval_s=MIN_SAMPLE_INTERVAL_S, device=None, history=600):
        self.meter = meter if meter is not None else GpuMeter(_device_index(device))
        self.temperature_c = self.power_w = self.memory_bandwidth_util = None
        self.nan_temperature_readings = 0
        state = torch.full((len(STATE_FIELDS),), math.nan, dtype=torch.float32)
        self.host_state = state.pin_memory() if torch.cuda.is_available() else state
        self.slowdown_temp_c = self.meter.temperature_thresholds_c()["slowdown"] if self.available else None
        self._sampler = BackgroundSampler(_TappedMeter(self.meter, self._ingest), interval_s)
        self._sampler.samples = deque(maxlen=history)
        self._lock = threading.Lock()
        self._warned_unavailable = False
        if self.available:
            self.poll()

    @property
    def available(self):
        return self.meter.available

    @property
    def unavailable_reason(self):
        return self.meter.unavailable_reason

    @property
    def samples(self):
        return self._sampler.samples

    def poll(self):
        """Read the meter once now and cache the reading (what the sampler thread does)."""
        return _TappedMeter(self.meter, self._ingest).read()

    def warn_unavailable(self):
        """Warn, once per monitor, that routing runs on the cost model alone (no NVML)."""
        if not self.available and not self._warned_unavailable:
            self._warned_unavailable = True
            warnings.warn(f"no GPU hardware state ({self.unavailable_reason}): the router runs on the "
                          "cost model alone (no temperature or memory-pressure terms)", RuntimeWarning, stacklevel=3)

    def start(self):
        self._sampler.start()
        return self

    def stop(self):
        self._sampler.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _ingest(self, reading):
        with self._lock:  # the sampler thread and poll() may both ingest
            self._ingest_temperature(reading.temperature_c)
            power_w = reading.power_average_w if reading.power_average_w is not None else reading.power_instant_w
            if power_w is not None:
                self.power_w = power_w
            if reading.memory_bandwidth_util_pct is not None:
                self.memory_bandwidth_util = reading.memory_bandwidth_util_pct / 100.0
            self.host_state.copy_(torch.tensor([_or_nan(getattr(self, f)) for f in STATE_FIELDS]))

    def _ingest_temperature(self, temperature_c):
        if temperature_c is None:
            return
        if not math.isfinite(temperature_c):
            self.nan_temperature_readings += 1
            warnings.warn(f"NVML gave a non-finite temperature ({temperature_c}); ignored, keeping the last good "
                          f"reading ({self.temperature_c} °C)", RuntimeWarning, stacklevel=2)
            return
        self.temperature_c = temperature_c


def _or_nan(value):
    return math.nan if value is None else float(value)


def _device_index(device):
    index = None if device is None else torch.device(device).index
    if index is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    return index
