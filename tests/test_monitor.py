"""HardwareMonitor: bad arguments, and physically impossible NVML readings never cached as valid."""
import math
import warnings

import numpy as np
import pytest
import torch

from calibration.nvml_meter import GpuMeter
from calibration.trace import ReplayNvml
from router import HardwareMonitor
from tests.conftest import DEVICE
from tests.fake_nvml import FakeNvml


class UtilNvml(FakeNvml):
    """FakeNvml with a settable memory-bandwidth utilisation (%)."""
    util_pct = 40

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Util", (), {"gpu": 90, "memory": self.util_pct})()


def replay_monitor(temp_c=60.0, power_w=100.0, util_pct=50, slowdown_c=89, shutdown_c=95):
    """A monitor of a one-reading replayed trace: whatever it caches comes from that reading."""
    reading = {"time_s": 0.0, "energy_mj": 1, "power_instant_w": power_w, "power_average_w": power_w,
               "temperature_c": temp_c, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "clock_event_reasons": 0,
               "memory_used_bytes": 1, "memory_bandwidth_util_pct": util_pct, "missing": {}}
    trace = {"gpu_name": "NVIDIA H100", "driver": "1", "thresholds_c": {"slowdown": slowdown_c, "shutdown": shutdown_c},
             "readings": [reading]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return HardwareMonitor(GpuMeter(nvml=ReplayNvml(trace)))


def meter():
    return GpuMeter(nvml=FakeNvml())


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: HardwareMonitor(meter="x"), TypeError, "meter must be a calibration.nvml_meter.GpuMeter"),
    (lambda: HardwareMonitor(meter=FakeNvml()), TypeError, "meter must be a calibration.nvml_meter.GpuMeter"),
    (lambda: HardwareMonitor(meter(), history=-1), ValueError, "history must be an int >= 0"),
    (lambda: HardwareMonitor(meter(), history=1.5), TypeError, "history must be an int"),
    (lambda: HardwareMonitor(meter(), history=True), TypeError, "history must be an int"),
    (lambda: HardwareMonitor(meter(), interval_s="1"), TypeError, "interval_s must be a real number"),
    (lambda: HardwareMonitor(meter(), interval_s=0), ValueError, "interval_s must be a finite number >= 0.1"),
    (lambda: HardwareMonitor(meter(), interval_s=math.inf), ValueError, "interval_s must be a finite number"),
    (lambda: HardwareMonitor(meter(), interval_s=math.nan), ValueError, "interval_s must be a finite number"),
    (lambda: HardwareMonitor(meter(), device="cuda:0"), ValueError, "give meter or device, not both"),
    (lambda: HardwareMonitor(device="tpu:0"), ValueError, "device must be a CUDA device"),
    (lambda: HardwareMonitor(device="cpu"), ValueError, "device must be a CUDA device"),
    (lambda: HardwareMonitor(device=1.5), TypeError, "device must be a CUDA device"),
])
def test_bad_arguments(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_numpy_arguments_and_no_history():
    monitor = HardwareMonitor(meter(), interval_s=np.float64(0.2), history=np.int64(0))
    assert monitor.samples.maxlen == 0 and monitor.temperature_c == 45.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(temp_c=-300.0), "temperature_c"), (dict(temp_c=-273.15), "temperature_c"),
    (dict(temp_c=5000.0), "temperature_c"), (dict(temp_c=200.5), "temperature_c"),
    (dict(power_w=-50.0), "power_w"), (dict(power_w=4.29e6), "power_w"),
    (dict(util_pct=250), "memory_bandwidth_util"), (dict(util_pct=-10), "memory_bandwidth_util"),
])
def test_an_impossible_first_reading_stays_unknown(kwargs, field):
    monitor = replay_monitor(**kwargs)
    assert getattr(monitor, field) is None and monitor.impossible_readings[field] == 1
    index = ("temperature_c", "power_w", "memory_bandwidth_util").index(field)
    assert math.isnan(monitor.host_state[index].item()), "NaN: the router's 'unknown'"
    others = [i for i in range(3) if i != index]
    assert not any(math.isnan(monitor.host_state[i].item()) for i in others), "the other fields still cache"


def test_possible_extremes_are_kept():
    monitor = replay_monitor(temp_c=200.0, power_w=0.0, util_pct=100)
    assert (monitor.temperature_c, monitor.power_w, monitor.memory_bandwidth_util) == (200.0, 0.0, 1.0)
    assert monitor.impossible_readings == {"temperature_c": 0, "power_w": 0, "memory_bandwidth_util": 0}


@pytest.mark.parametrize("attribute, value, field, kept", [
    ("temperature_c", -300, "temperature_c", 55.0), ("temperature_c", 5000, "temperature_c", 55.0),
    ("power_w", -50.0, "power_w", 150.0), ("util_pct", 250, "memory_bandwidth_util", 0.4),
])
def test_an_impossible_reading_keeps_the_last_good_one_with_a_warning(attribute, value, field, kept):
    nvml = UtilNvml(temperature_c=55)
    monitor = HardwareMonitor(GpuMeter(nvml=nvml))
    before = monitor.host_state.clone()
    setattr(nvml, attribute, value)
    with pytest.warns(RuntimeWarning, match=f"impossible {field}"):
        monitor.poll()
    assert getattr(monitor, field) == pytest.approx(kept) and monitor.impossible_readings[field] == 1
    assert torch.equal(monitor.host_state, before) and monitor.nan_temperature_readings == 0


@pytest.mark.parametrize("slowdown_c, shutdown_c", [(120, 95), (-300, 95), (89, 5000), (math.nan, 95)])
def test_impossible_thresholds_leave_the_slowdown_threshold_unknown(slowdown_c, shutdown_c):
    reading = {"time_s": 0.0, "energy_mj": 1, "power_instant_w": 100.0, "power_average_w": 100.0,
               "temperature_c": 60.0, "sm_clock_mhz": 1, "mem_clock_mhz": 1, "clock_event_reasons": 0,
               "memory_used_bytes": 1, "memory_bandwidth_util_pct": 50}
    trace = {"gpu_name": "x", "driver": "1", "thresholds_c": {"slowdown": slowdown_c, "shutdown": shutdown_c},
             "readings": [reading]}
    with pytest.warns(RuntimeWarning, match="impossible temperature thresholds"):
        monitor = HardwareMonitor(GpuMeter(nvml=ReplayNvml(trace)))
    assert monitor.slowdown_temp_c is None and monitor.temperature_c == 60.0


def test_possible_thresholds_are_kept():
    assert replay_monitor(slowdown_c=89, shutdown_c=95).slowdown_temp_c == 89
    assert replay_monitor(slowdown_c=89, shutdown_c=None).slowdown_temp_c == 89


def test_the_router_routes_on_unknown_not_on_an_impossible_temperature():
    from costmodel import KernelCostModel
    from router import EnergyAwareTTTRouter
    model = KernelCostModel("H100")
    router = EnergyAwareTTTRouter(model.dims.d_model, 4, 2, model, monitor=replay_monitor(temp_c=-300.0)).to(DEVICE)
    router(torch.randn(4, model.dims.d_model, device=DEVICE))
    state = router._state().tolist()  # what the kernels read
    assert math.isnan(state[0]) and state[1:] == pytest.approx([100.0, 0.5])
