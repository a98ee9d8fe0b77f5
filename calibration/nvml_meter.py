"""The GPU meter: NVML readings with a reason for every figure it cannot give.

``GpuMeter.read()`` returns one ``GpuReading``: the total-energy counter, instant and average
power (NVML field values), temperature, SM and memory clocks, the clock-event (throttle) reason
bits, memory used and memory-bandwidth utilisation. Where NVML, the GPU or one query is missing,
that field is ``None`` and ``missing[field]`` says why: never an estimate. ``BackgroundSampler``
records readings on a thread at up to 10 Hz (NVML's power and energy update about every 100 ms).
Nothing here changes a GPU setting.
"""
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from calibration.validate import check_meter
from costmodel.validate import count, finite_number

MIN_SAMPLE_INTERVAL_S = 0.1  # NVML's energy counter and power average update about every 100 ms

# clock-event reason bits (nvmlClocksEventReason*) that mean the card slowed itself down
THERMAL_OR_POWER_SLOWDOWN_REASONS = {
    "nvmlClocksEventReasonSwPowerCap": "sw_power_cap",
    "nvmlClocksEventReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksEventReasonSwThermalSlowdown": "sw_thermal_slowdown",
    "nvmlClocksEventReasonHwThermalSlowdown": "hw_thermal_slowdown",
    "nvmlClocksEventReasonHwPowerBrakeSlowdown": "hw_power_brake_slowdown",
}


@dataclass(frozen=True)
class GpuReading:
    time_s: float  # host monotonic clock
    energy_mj: Optional[int] = None  # total energy since the driver loaded
    power_instant_w: Optional[float] = None
    power_average_w: Optional[float] = None
    temperature_c: Optional[float] = None
    sm_clock_mhz: Optional[int] = None
    mem_clock_mhz: Optional[int] = None
    clock_event_reasons: Optional[int] = None
    memory_used_bytes: Optional[int] = None
    memory_bandwidth_util_pct: Optional[int] = None
    missing: dict = field(default_factory=dict)  # field name -> why it is None


def _load_pynvml():
    import pynvml
    return pynvml


class GpuMeter:
    """NVML readings for one GPU. ``nvml`` is the pynvml module (injectable, for fakes and replays)."""

    def __init__(self, device_index=0, nvml=None):
        self.device_index = count("device_index", device_index, low=0)
        self.unavailable_reason = None
        self._handle = None
        if nvml is not None and not callable(getattr(nvml, "nvmlInit", None)):
            raise TypeError(f"nvml must be the pynvml module or a stand-in with its calls (nvmlInit, ...), "
                            f"got {type(nvml).__name__}")
        try:
            self.nvml = nvml if nvml is not None else _load_pynvml()
        except ImportError as exc:
            self.nvml, self.unavailable_reason = None, f"pynvml is not importable ({exc}); install nvidia-ml-py"
            return
        try:
            self.nvml.nvmlInit()
            self._handle = self.nvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:  # NVMLError_* (no driver, no GPU, bad index): the meter reads nothing
            self.unavailable_reason = f"NVML unavailable: {exc.__class__.__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _query(self, missing, name, fn, *args):
        try:
            return fn(self._handle, *args)
        except Exception as exc:  # NVMLError_NotSupported etc.: this field is unknown, the rest still read
            missing[name] = f"{fn.__name__}: {exc.__class__.__name__}: {exc}"
            return None

    def name(self) -> "str | None":
        """The GPU name NVML reports, or None."""
        if not self.available:
            return None
        value = self._query({}, "name", self.nvml.nvmlDeviceGetName)
        return value.decode() if isinstance(value, bytes) else value

    def uuid(self) -> "str | None":
        """The board's NVML UUID (tells one card from another of the same model), or None."""
        if not self.available:
            return None
        value = self._query({}, "uuid", self.nvml.nvmlDeviceGetUUID)
        return value.decode() if isinstance(value, bytes) else value

    def driver_version(self) -> "str | None":
        if not self.available:
            return None
        value = self.nvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else value

    def temperature_thresholds_c(self) -> dict:
        """{"slowdown": °C, "shutdown": °C, "missing": reasons} as NVML reports them."""
        kinds = {"slowdown": "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", "shutdown": "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN"}
        if not self.available:
            return dict.fromkeys(kinds) | {"missing": dict.fromkeys(kinds, self.unavailable_reason)}
        missing = {}
        out = {kind: self._query(missing, kind, self.nvml.nvmlDeviceGetTemperatureThreshold, getattr(self.nvml, const))
               for kind, const in kinds.items()}
        return out | {"missing": missing}

    def read(self) -> GpuReading:
        """One ``GpuReading`` now."""
        if not self.available:
            names = [n for n in GpuReading.__dataclass_fields__ if n not in ("time_s", "missing")]
            return GpuReading(time_s=time.monotonic(), missing=dict.fromkeys(names, self.unavailable_reason))
        nv, missing = self.nvml, {}
        instant_w, average_w = self._power_fields(missing)
        temperature = self._query(missing, "temperature_c", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        memory = self._query(missing, "memory_used_bytes", nv.nvmlDeviceGetMemoryInfo)
        util = self._query(missing, "memory_bandwidth_util_pct", nv.nvmlDeviceGetUtilizationRates)
        events = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return GpuReading(
            time_s=time.monotonic(),
            energy_mj=self._query(missing, "energy_mj", nv.nvmlDeviceGetTotalEnergyConsumption),
            power_instant_w=instant_w, power_average_w=average_w,
            temperature_c=None if temperature is None else float(temperature),
            sm_clock_mhz=self._query(missing, "sm_clock_mhz", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
            mem_clock_mhz=self._query(missing, "mem_clock_mhz", nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM),
            clock_event_reasons=self._query(missing, "clock_event_reasons", events),
            memory_used_bytes=None if memory is None else memory.used,
            memory_bandwidth_util_pct=None if util is None else util.memory, missing=missing)

    def _power_fields(self, missing):
        """Instant and average power (W) from NVML field values (reported in mW)."""
        names = ("power_instant_w", "power_average_w")
        nv = self.nvml
        values = self._query(missing, "power", nv.nvmlDeviceGetFieldValues,
                             [nv.NVML_FI_DEV_POWER_INSTANT, nv.NVML_FI_DEV_POWER_AVERAGE])
        if values is None:
            reason = missing.pop("power")
            missing.update(dict.fromkeys(names, reason))
            return None, None
        out = []
        for name, value in zip(names, values):
            if value.nvmlReturn != 0:
                missing[name] = f"nvmlDeviceGetFieldValues: NVML error {value.nvmlReturn} for this field"
                out.append(None)
            else:
                out.append(value.value.uiVal / 1000.0)
        return tuple(out)

    def slowdown_reasons(self, bits: int | None) -> "list[str] | None":
        """Names of the thermal/power slowdown reasons set in ``bits`` (clock-event reason bits, an int), or None."""
        if bits is None:
            return None
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise TypeError(f"bits must be an int of clock-event reason bits or None, got {type(bits).__name__}")
        if bits < 0:
            raise ValueError(f"bits must be NVML's clock-event reason bits, an unsigned int, got {bits}")
        return [name for const, name in THERMAL_OR_POWER_SLOWDOWN_REASONS.items()
                if bits & getattr(self.nvml, const, 0)]


def check_interval_s(interval_s: object) -> float:
    """``interval_s`` as a float: a finite sampling period (s) >= ``MIN_SAMPLE_INTERVAL_S``."""
    return finite_number("interval_s", interval_s, low=MIN_SAMPLE_INTERVAL_S,
                         why=" s (NVML updates about every 100 ms)")


class BackgroundSampler:
    """Reads ``meter`` every ``interval_s`` (finite, >= 0.1 s) on a daemon thread; ``samples`` is the timeline.

    Use as a context manager; ``latest`` is the newest reading (what a hot path may read: never NVML)."""

    def __init__(self, meter, interval_s=0.1):
        self.meter = check_meter("meter", meter)
        self.interval_s = check_interval_s(interval_s)
        self.samples = []
        self._stop = threading.Event()
        self._thread = None

    @property
    def latest(self) -> "GpuReading | None":
        return self.samples[-1] if self.samples else None

    def start(self) -> "BackgroundSampler":
        if self._thread is not None:
            raise RuntimeError("sampler already started (each runs once: make a new one to sample again)")
        self._thread = threading.Thread(target=self._run, name="gpu-meter-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "list[GpuReading]":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples

    def _run(self):
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(self.meter.read())
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()



def meter_for_cuda_device(cuda_index: int | None = None) -> GpuMeter:
    """The ``GpuMeter`` of a CUDA device (default: the current one), found by UUID: CUDA numbers
    only the visible GPUs (CUDA_VISIBLE_DEVICES, by index or UUID), NVML numbers them all."""
    import torch
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device (torch.cuda.is_available() is False): no CUDA device's meter to find")
    index = torch.cuda.current_device() if cuda_index is None else count("cuda_index", cuda_index, low=0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"cuda_index must be below the {torch.cuda.device_count()} visible CUDA devices, got {index}")
    cuda_uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
    first = GpuMeter(0)
    if not first.available:
        return first  # unavailable, with the reason
    for nvml_index in range(first.nvml.nvmlDeviceGetCount()):
        meter = GpuMeter(nvml_index, nvml=first.nvml)
        if meter.uuid() == cuda_uuid:
            return meter
    raise RuntimeError(f"no NVML device has CUDA device {index}'s UUID {cuda_uuid}")
