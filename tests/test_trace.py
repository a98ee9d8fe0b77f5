"""Record a meter timeline and replay it as a pynvml stand-in."""
import time

import pytest

from calibration.nvml_meter import GpuMeter
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
