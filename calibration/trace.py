"""Record NVML timelines on a real GPU and replay them as a stand-in pynvml module.

``python -m calibration.trace --seconds 10 --output calibration/traces/<name>.json`` records the
meter's readings (with the GPU name, driver and provenance). ``ReplayNvml(trace)`` then plays
them back to ``GpuMeter(nvml=...)``: each query answers with the reading recorded at the same
time since the replay started (the last one once past the end), and a figure the real GPU could
not give raises again with its recorded reason, so CPU tests see what the card really reported.
"""
import argparse
import bisect
import math
import numbers
import sys
import time
from dataclasses import asdict, fields
from types import SimpleNamespace

from calibration.nvml_meter import BackgroundSampler, GpuMeter, GpuReading
from calibration.validate import check_meter
from costmodel.validate import finite_number

# what every reading of a trace records (``missing``, the reasons, is optional)
READING_FIELDS = tuple(f.name for f in fields(GpuReading) if f.name != "missing")


class ReplayedNVMLError(Exception):
    """A query the recorded GPU could not answer; the message is the recorded reason."""


def record(meter: "GpuMeter", seconds: float, interval_s: float = 0.1) -> dict:
    """A trace dict: ``readings`` over ``seconds`` (finite, > 0; time relative to the first) plus
    what the meter knows of the GPU."""
    check_meter("meter", meter, "available", "unavailable_reason")
    seconds = finite_number("seconds", seconds, low=0.0, low_open=True, why=" s")
    if not meter.available:
        raise RuntimeError(f"cannot record a trace: {meter.unavailable_reason}")
    with BackgroundSampler(meter, interval_s) as sampler:
        time.sleep(seconds)
    return trace_of(meter, sampler)


def trace_of(meter: "GpuMeter", sampler: "BackgroundSampler") -> dict:
    """The trace dict of a finished ``BackgroundSampler``'s timeline (RuntimeError if it has none)."""
    if not sampler.samples:
        raise RuntimeError("the sampler recorded no readings: record for longer")
    t0 = sampler.samples[0].time_s
    return {"gpu_name": meter.name(), "gpu_uuid": meter.uuid(), "driver": meter.driver_version(),
            "interval_s": sampler.interval_s,
            "thresholds_c": meter.temperature_thresholds_c(),
            "readings": [asdict(r) | {"time_s": r.time_s - t0} for r in sampler.samples]}


class PynvmlConstants:
    """The pynvml constants ``GpuMeter`` reads, with pynvml's values, for stand-in modules."""
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_FI_DEV_POWER_AVERAGE = 185
    NVML_FI_DEV_POWER_INSTANT = 186


class ReplayNvml(PynvmlConstants):
    """Plays a recorded trace back through the pynvml calls ``GpuMeter`` makes.

    ``trace`` is what ``record`` returns: ``gpu_name``, ``driver``, ``thresholds_c`` (``slowdown``
    and ``shutdown``) and a non-empty list of ``readings``, each with every ``GpuReading`` field
    (``missing`` optional) and ``time_s`` finite and non-decreasing; anything else is a ValueError
    naming the missing or bad field. The values themselves are replayed as recorded."""

    def __init__(self, trace):
        _check_trace(trace)
        self.trace = trace
        self._times = [r["time_s"] for r in trace["readings"]]
        self._start = None

    def _now(self):
        elapsed = time.monotonic() - self._start
        return self.trace["readings"][max(0, bisect.bisect_right(self._times, elapsed) - 1)]

    def _field(self, name):
        reading = self._now()
        if reading[name] is None:
            raise ReplayedNVMLError(reading.get("missing", {}).get(name, "not recorded"))
        return reading[name]

    def nvmlInit(self) -> None:
        self._start = time.monotonic()

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.trace["gpu_name"]

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        if not self.trace.get("gpu_uuid"):
            raise ReplayedNVMLError("not recorded")
        return self.trace["gpu_uuid"]

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.trace["driver"]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # mJ
        return self._field("energy_mj")

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: "list[int]") -> "list[SimpleNamespace]":  # power in mW
        names = {185: "power_average_w", 186: "power_instant_w"}
        reading = self._now()
        return [SimpleNamespace(nvmlReturn=0 if reading[names[f]] is not None else 3,
                                value=SimpleNamespace(uiVal=round((reading[names[f]] or 0) * 1000)))
                for f in field_ids]

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> float:  # °C
        return self._field("temperature_c")

    def nvmlDeviceGetTemperatureThreshold(self, handle: int, kind: int) -> float:  # °C
        value = self.trace["thresholds_c"]["slowdown" if kind == 1 else "shutdown"]
        if value is None:
            raise ReplayedNVMLError("threshold not recorded")
        return value

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:  # MHz
        return self._field("sm_clock_mhz" if clock == 1 else "mem_clock_mhz")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._field("clock_event_reasons")

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # .used: bytes
        return SimpleNamespace(used=self._field("memory_used_bytes"))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # .memory: percent
        return SimpleNamespace(memory=self._field("memory_bandwidth_util_pct"))


def _check_trace(trace):
    if not isinstance(trace, dict):
        raise TypeError(f"trace must be a dict (what calibration.trace.record returns), got {type(trace).__name__}")
    for key in ("readings", "gpu_name", "driver", "thresholds_c"):
        if key not in trace:
            raise ValueError(f"trace has no {key!r} field (a calibration.trace.record trace has it)")
    for key in ("gpu_name", "driver"):
        if trace[key] is not None and not isinstance(trace[key], str):
            raise ValueError(f"trace[{key!r}] must be a string or None, got {trace[key]!r}")
    thresholds = trace["thresholds_c"]
    if not isinstance(thresholds, dict) or not {"slowdown", "shutdown"} <= set(thresholds) or \
            not all(_number_or_none(thresholds[kind]) for kind in ("slowdown", "shutdown")):
        raise ValueError(f"trace['thresholds_c'] must be a dict with 'slowdown' and 'shutdown' (°C or None), "
                         f"got {thresholds!r}")
    readings = trace["readings"]
    if not isinstance(readings, list) or not readings:
        raise ValueError(f"trace['readings'] must be a non-empty list of readings, got {readings!r:.80}")
    last_s = -math.inf
    for n, reading in enumerate(readings):
        if not isinstance(reading, dict):
            raise ValueError(f"trace['readings'][{n}] must be a dict of a reading's fields, got "
                             f"{type(reading).__name__}")
        absent = [name for name in READING_FIELDS if name not in reading]
        if absent:
            raise ValueError(f"trace['readings'][{n}] has no {', '.join(map(repr, absent))} field")
        not_numbers = [name for name in READING_FIELDS if name != "time_s" and not _number_or_none(reading[name])]
        if not_numbers:
            name = not_numbers[0]
            raise ValueError(f"trace['readings'][{n}][{name!r}] must be a number or None, got {reading[name]!r}")
        if not isinstance(reading.get("missing", {}), dict):
            raise ValueError(f"trace['readings'][{n}]['missing'] must be a dict of reasons, got {reading['missing']!r}")
        time_s = reading["time_s"]
        if isinstance(time_s, bool) or not isinstance(time_s, numbers.Real) or not math.isfinite(time_s) \
                or time_s < last_s:
            raise ValueError(f"trace['readings'][{n}]['time_s'] must be a finite number, no earlier than the "
                             f"reading before ({last_s}), got {time_s!r}")
        last_s = time_s


def _number_or_none(value):
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def main(argv: list | None = None) -> int:
    from calibration.results import provenance, write_json_atomic
    parser = argparse.ArgumentParser(prog="python -m calibration.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        parser.error(f"--seconds must be a positive finite number, got {args.seconds}")
    meter = GpuMeter()
    if not meter.available:
        parser.error(f"no GPU to record: {meter.unavailable_reason}")
    trace = record(meter, args.seconds) | {"provenance": provenance()}
    write_json_atomic(args.output, trace)
    print(f"wrote {args.output}: {len(trace['readings'])} readings of {trace['gpu_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
