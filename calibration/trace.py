"""Record NVML timelines on a real GPU and replay them as a stand-in pynvml module.

``python -m calibration.trace --seconds 10 --output calibration/traces/<name>.json`` records the
meter's readings (with the GPU name, driver and provenance). ``ReplayNvml(trace)`` then plays
them back to ``GpuMeter(nvml=...)``: each query answers with the reading recorded at the same
time since the replay started (the last one once past the end), and a figure the real GPU could
not give raises again with its recorded reason, so CPU tests see what the card really reported.
"""
import argparse
import bisect
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

from calibration.nvml_meter import BackgroundSampler, GpuMeter


class ReplayedNVMLError(Exception):
    """A query the recorded GPU could not answer; the message is the recorded reason."""


def record(meter, seconds, interval_s=0.1):
    """A trace dict: ``readings`` (time relative to the first) plus what the meter knows of the GPU."""
    if not meter.available:
        raise RuntimeError(f"cannot record a trace: {meter.unavailable_reason}")
    with BackgroundSampler(meter, interval_s) as sampler:
        time.sleep(seconds)
    return trace_of(meter, sampler)


def trace_of(meter, sampler):
    """The trace dict of a finished ``BackgroundSampler``'s timeline."""
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
    """Plays a recorded trace back through the pynvml calls ``GpuMeter`` makes."""

    def __init__(self, trace):
        self.trace = trace
        self._times = [r["time_s"] for r in trace["readings"]]
        self._start = None

    def _now(self):
        elapsed = time.monotonic() - self._start
        return self.trace["readings"][max(0, bisect.bisect_right(self._times, elapsed) - 1)]

    def _field(self, name):
        reading = self._now()
        if reading[name] is None:
            raise ReplayedNVMLError(reading["missing"].get(name, "not recorded"))
        return reading[name]

    def nvmlInit(self):
        self._start = time.monotonic()

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.trace["gpu_name"]

    def nvmlDeviceGetUUID(self, handle):
        if not self.trace.get("gpu_uuid"):
            raise ReplayedNVMLError("not recorded")
        return self.trace["gpu_uuid"]

    def nvmlSystemGetDriverVersion(self):
        return self.trace["driver"]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._field("energy_mj")

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        names = {185: "power_average_w", 186: "power_instant_w"}
        reading = self._now()
        return [SimpleNamespace(nvmlReturn=0 if reading[names[f]] is not None else 3,
                                value=SimpleNamespace(uiVal=round((reading[names[f]] or 0) * 1000)))
                for f in field_ids]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._field("temperature_c")

    def nvmlDeviceGetTemperatureThreshold(self, handle, kind):
        value = self.trace["thresholds_c"]["slowdown" if kind == 1 else "shutdown"]
        if value is None:
            raise ReplayedNVMLError("threshold not recorded")
        return value

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return self._field("sm_clock_mhz" if clock == 1 else "mem_clock_mhz")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._field("clock_event_reasons")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self._field("memory_used_bytes"))

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(memory=self._field("memory_bandwidth_util_pct"))


def main(argv=None):
    from bench.harness.results import provenance, write_json_atomic
    parser = argparse.ArgumentParser(prog="python -m calibration.trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    meter = GpuMeter()
    if not meter.available:
        parser.error(f"no GPU to record: {meter.unavailable_reason}")
    trace = record(meter, args.seconds) | {"provenance": provenance()}
    write_json_atomic(args.output, trace)
    print(f"wrote {args.output}: {len(trace['readings'])} readings of {trace['gpu_name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
