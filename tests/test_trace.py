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
    from bench.calibrate import thermal_section
    from costmodel.kernel_cost_model import KernelCostModel
    readings = [GpuReading(**r) for r in h100_trace["readings"]]
    refit = thermal_section(readings, h100_trace["thresholds_c"])
    table = KernelCostModel("H100").table
    assert table["source"] == "measured" and table["gpu_name"] == h100_trace["gpu_name"]
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
