"""Energy windows on a fake counter that, like the H100's, updates every 100 ms."""
import time

import pytest

from calibration.energy import measure_energy, measure_idle_power_w, wait_for_counter_update
from calibration.nvml_meter import GpuMeter
from tests.fake_nvml import FakeNvml


def sleeping_runner(nvml, busy_power_w, call_s=0.01):
    """A stand-in workload: each 'call' is call_s of busy power; the fake board idles otherwise."""
    idle = nvml.power_w

    def run_for(seconds):
        nvml.power_w = busy_power_w
        calls, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(call_s)
            calls += 1
        nvml.power_w = idle
        return calls
    return run_for


def test_energy_per_call_matches_power_times_time():
    nvml = FakeNvml(power_w=70.0)
    meter = GpuMeter(nvml=nvml)
    result = measure_energy(meter, sleeping_runner(nvml, 300.0), idle_power_w=70.0, window_s=1.0, trials=2)
    seconds_per_call = sum(result["window_s"]) / sum(result["calls_per_window"])
    assert result["energy_j"] == pytest.approx(300.0 * seconds_per_call, rel=0.15)
    assert result["energy_j_min"] <= result["energy_j"] <= result["energy_j_max"]
    assert result["power_w"] == pytest.approx(300.0, rel=0.15)
    assert result["state_start"]["temperature_c"] == 45.0


def test_idle_power_and_counter_edges():
    meter = GpuMeter(nvml=FakeNvml(power_w=73.0))
    assert measure_idle_power_w(meter, seconds=0.5) == pytest.approx(73.0, rel=0.05)
    assert wait_for_counter_update(meter).energy_mj % 7300 == 0


def test_no_counter_is_an_error_not_a_guess():
    meter = GpuMeter(nvml=FakeNvml(unsupported={"nvmlDeviceGetTotalEnergyConsumption"}))
    with pytest.raises(RuntimeError, match="no energy counter"):
        wait_for_counter_update(meter)


@pytest.mark.parametrize("kwargs, match", [(dict(window_s=0.5), "window_s"), (dict(trials=0), "trials")])
def test_bad_arguments(kwargs, match):
    nvml = FakeNvml()
    with pytest.raises(ValueError, match=match):
        measure_energy(GpuMeter(nvml=nvml), sleeping_runner(nvml, 100.0), idle_power_w=70.0, **kwargs)


def test_bandwidth_hog_share_is_checked():
    from calibration.pressure import BandwidthHog
    for share in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="share"):
            BandwidthHog(share)
