"""Record a meter timeline and replay it as a pynvml stand-in; the committed H100 trace replayed."""
import json
import time
from pathlib import Path

import pytest

from calibration.energy import measure_window
from calibration.nvml_meter import GpuMeter, GpuReading
from calibration.trace import ReplayNvml, record
from tests.fake_nvml import FakeNvml


def test_record_then_replay_gives_back_the_recorded_readings():
    nvml = FakeNvml(power_w=90.0, temperature_c=40, unsupported={"nvmlDeviceGetUtilizationRates"})
    trace = record(GpuMeter(nvml=nvml), seconds=0.35)
    assert len(trace["readings"]) >= 3 and trace["readings"][0]["time_s"] == 0.0
    assert trace["gpu_name"] == "NVIDIA H100 80GB HBM3" and trace["thresholds_c"]["slowdown"] == 87

    replayed = GpuMeter(nvml=ReplayNvml(trace))
    first = replayed.read()
    recorded = trace["readings"][0]
    assert first.energy_mj == recorded["energy_mj"] and first.temperature_c == 40.0
    assert first.power_average_w == pytest.approx(90.0)
    assert first.memory_bandwidth_util_pct is None and "NotSupported" in first.missing["memory_bandwidth_util_pct"]
    time.sleep(trace["readings"][-1]["time_s"] + 0.05)
    assert replayed.read().energy_mj == trace["readings"][-1]["energy_mj"], "past the end: the last reading"
    assert replayed.temperature_thresholds_c()["shutdown"] == 92


def test_record_needs_a_gpu():
    with pytest.raises(RuntimeError, match="cannot record"):
        record(GpuMeter(nvml=FakeNvml(fail_init=True)), seconds=0.1)


def test_stand_in_constants_are_pynvml_values():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    from calibration.trace import PynvmlConstants
    for name, value in vars(PynvmlConstants).items():
        if name.startswith("NVML_"):
            assert getattr(pynvml, name) == value, name


# --- the committed H100 trace: the timeline of the sweep that wrote calibration/tables/H100.json ---
TRACE_PATH = Path(__file__).resolve().parent.parent / "calibration" / "traces" / "H100_calibrate.json"


@pytest.fixture(scope="module")
def h100_trace():
    return json.loads(TRACE_PATH.read_text())


def test_committed_table_thermal_fit_comes_from_the_committed_trace(h100_trace):
    from calibration.sweep import thermal_section
    from costmodel.kernel_cost_model import KernelCostModel
    readings = [GpuReading(**r) for r in h100_trace["readings"]]
    refit = thermal_section(readings, h100_trace["thresholds_c"])
    table = KernelCostModel("H100").table
    assert table["source"] == "measured" and table["gpu_name"] == h100_trace["gpu_name"]
    if "thermal_note" in table:  # a fit carried over from an earlier sweep names that sweep's commit
        assert h100_trace["provenance"]["commit"][:7] in table["thermal_note"]
    else:
        assert table["provenance"]["commit"] == h100_trace["provenance"]["commit"]
    for key in ("ambient_c", "resistance_c_per_w", "time_constant_s", "fit_rmse_c", "n_samples"):
        assert refit[key] == pytest.approx(table["thermal"][key], rel=1e-6), key


def test_energy_window_on_the_replayed_h100_counter(h100_trace):
    """The window method against the real card's counter cadence: energy over 1 s of replay matches
    the recorded instant power integrated over the same stretch (±15%: NVML's averaging and steps)."""
    trimmed = h100_trace | {"readings": [r for r in h100_trace["readings"] if r["time_s"] < 2.0]}
    meter = GpuMeter(nvml=ReplayNvml(trimmed))
    window = measure_window(meter, lambda seconds: time.sleep(seconds) or 1, 1.0, idle_power_w=0.0)
    start, end = window.start.time_s - meter.nvml._start, window.end.time_s - meter.nvml._start
    recorded = [r for r in trimmed["readings"] if start <= r["time_s"] <= end]
    integrated_j = sum(r["power_instant_w"] for r in recorded) * trimmed["interval_s"]
    assert window.energy_j == pytest.approx(integrated_j, rel=0.15)


# ---- traces that cannot be replayed ------------------------------------------------------------------

def one_reading_trace(**reading):
    fields = {"time_s": 0.0, "energy_mj": 1, "power_instant_w": 100.0, "power_average_w": 100.0,
              "temperature_c": 60.0, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "clock_event_reasons": 0,
              "memory_used_bytes": 1, "memory_bandwidth_util_pct": 50, "missing": {}}
    return {"gpu_name": "NVIDIA H100", "gpu_uuid": "GPU-x", "driver": "1", "interval_s": 0.1,
            "thresholds_c": {"slowdown": 89, "shutdown": 95}, "readings": [fields | reading]}


def without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


TRACE = one_reading_trace()
READING = TRACE["readings"][0]


@pytest.mark.parametrize("trace, error, phrase", [
    ([READING], TypeError, "trace must be a dict"),
    ({"gpu_name": "x"}, ValueError, "trace has no 'readings' field"),
    (without(TRACE, "driver"), ValueError, "trace has no 'driver' field"),
    (without(TRACE, "thresholds_c"), ValueError, "trace has no 'thresholds_c' field"),
    (TRACE | {"thresholds_c": {"slowdown": 89}}, ValueError, "'slowdown' and 'shutdown'"),
    (TRACE | {"readings": []}, ValueError, r"trace\['readings'\] must be a non-empty list"),
    (TRACE | {"readings": {"0": READING}}, ValueError, r"trace\['readings'\] must be a non-empty list"),
    (TRACE | {"readings": [5]}, ValueError, r"trace\['readings'\]\[0\] must be a dict"),
    (TRACE | {"readings": [without(READING, "energy_mj")]}, ValueError, r"\[0\] has no 'energy_mj' field"),
    (TRACE | {"readings": [{"time_s": 0.0}]}, ValueError, r"\[0\] has no 'energy_mj', 'power_instant_w'"),
    (TRACE | {"readings": [READING | {"time_s": float("nan")}]}, ValueError, r"\['time_s'\] must be a finite"),
    (TRACE | {"readings": [READING | {"time_s": "0"}]}, ValueError, r"\['time_s'\] must be a finite"),
    (TRACE | {"readings": [READING | {"time_s": 1.0}, READING]}, ValueError,
     r"\[1\]\['time_s'\] must be a finite number, no earlier than the reading before \(1.0\)"),
    (TRACE | {"readings": [READING | {"energy_mj": "12"}]}, ValueError, r"\['energy_mj'\] must be a number or None"),
    (TRACE | {"readings": [READING | {"temperature_c": True}]}, ValueError,
     r"\['temperature_c'\] must be a number or None"),
    (TRACE | {"readings": [READING | {"missing": "none"}]}, ValueError, r"\['missing'\] must be a dict"),
    (TRACE | {"thresholds_c": {"slowdown": "hot", "shutdown": 95}}, ValueError, "'slowdown' and 'shutdown'"),
    (TRACE | {"gpu_name": 100}, ValueError, r"trace\['gpu_name'\] must be a string or None"),
], ids=["list", "no-readings", "no-driver", "no-thresholds", "one-threshold", "readings-empty", "readings-dict",
        "reading-int", "no-energy", "only-time", "time-nan", "time-str", "time-backwards", "energy-str", "temp-bool",
        "missing-str", "threshold-str", "name-int"])
def test_replay_refuses_a_trace_it_cannot_play(trace, error, phrase):
    with pytest.raises(error, match=phrase):
        ReplayNvml(trace)


def test_replay_without_missing_reasons_or_uuid():
    trace = without(TRACE, "gpu_uuid") | {"readings": [without(READING, "missing") | {"sm_clock_mhz": None}]}
    meter = GpuMeter(nvml=ReplayNvml(trace))
    reading = meter.read()
    assert reading.sm_clock_mhz is None and "not recorded" in reading.missing["sm_clock_mhz"]
    assert reading.temperature_c == 60.0 and meter.uuid() is None


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: record(GpuMeter(nvml=FakeNvml()), seconds=-1), ValueError, "seconds must be a finite number > 0"),
    (lambda: record(GpuMeter(nvml=FakeNvml()), seconds=0), ValueError, "seconds must be a finite number > 0"),
    (lambda: record(GpuMeter(nvml=FakeNvml()), seconds=float("nan")), ValueError, "seconds must be a finite"),
    (lambda: record(GpuMeter(nvml=FakeNvml()), seconds="1"), TypeError, "seconds must be a real number"),
    (lambda: record(GpuMeter(nvml=FakeNvml()), seconds=0.2, interval_s=0.01), ValueError, "interval_s"),
    (lambda: record("gpu0", seconds=1), TypeError, "meter must be a calibration.nvml_meter.GpuMeter"),
])
def test_record_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()
