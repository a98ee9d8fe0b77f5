"""Energy windows on a fake counter that, like the H100's, updates every 100 ms."""
import math
import time

import numpy as np
import pytest

from calibration.energy import (EagerRunner, GraphRunner, event_times_ms, measure_energy, measure_gap_power_w,
                                measure_idle_power_w, measure_window, median_event_ms, repeat_for,
                                wait_for_counter_update)
from calibration.nvml_meter import GpuMeter, GpuReading
from calibration.pressure import BandwidthHog, background_utilisation, measure_pressure_curve
from calibration.priors import prior_table
from costmodel.ops import ModelDims
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


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: BandwidthHog(0.0), ValueError, "share must be a finite number in"),
    (lambda: BandwidthHog(1.5), ValueError, "share must be a finite number in"),
    (lambda: BandwidthHog(-0.2), ValueError, "share must be a finite number in"),
    (lambda: BandwidthHog(math.nan), ValueError, "share must be a finite number in"),
    (lambda: BandwidthHog("0.5"), TypeError, "share must be a real number"),
    (lambda: BandwidthHog(0.5, period_ms=0), ValueError, "period_ms must be a finite number > 0"),
    (lambda: background_utilisation(GpuMeter(nvml=FakeNvml()), [], window_s=0), ValueError, "window_s"),
    (lambda: background_utilisation("gpu0", []), TypeError, "meter must be"),
    (lambda: measure_pressure_curve(GpuMeter(nvml=FakeNvml()), None, [], {}, window_s=math.inf), ValueError,
     "window_s"),
])
def test_pressure_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


# ---- bad input and measurements that measured nothing ----------------------------------------------

class StepMeter:
    """A scripted meter: each read moves the counter by ``step_mj``; readings are stamped ``lag_s`` late."""

    def __init__(self, step_mj=100_000, lag_s=0.0, none_after=None):
        self.energy_mj, self.step_mj, self.lag_s, self.reads, self.none_after = 0, step_mj, lag_s, 0, none_after

    def read(self):
        self.reads += 1
        self.energy_mj += self.step_mj
        gone = self.none_after is not None and self.reads > self.none_after
        return GpuReading(time_s=time.monotonic() + self.lag_s, energy_mj=None if gone else self.energy_mj,
                          missing={"energy_mj": "counter gone"} if gone else {})


def sleeps(calls=1):
    return lambda seconds: time.sleep(seconds) or calls


def energy(**kwargs):
    args = dict(meter=StepMeter(), run_for=sleeps(), idle_power_w=70.0, trials=1) | kwargs
    return measure_energy(**args)


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: energy(idle_power_w=float("nan")), ValueError, "idle_power_w must be a finite number in"),
    (lambda: energy(idle_power_w=-1.0), ValueError, "idle_power_w must be a finite number in"),
    (lambda: energy(idle_power_w=1e9), ValueError, "idle_power_w must be a finite number in"),
    (lambda: energy(idle_power_w="70"), TypeError, "idle_power_w must be a real number"),
    (lambda: energy(window_s=True), TypeError, "window_s must be a real number"),
    (lambda: energy(window_s="2"), TypeError, "window_s must be a real number"),
    (lambda: energy(window_s=math.inf), ValueError, "window_s must be a finite number >= 1"),
    (lambda: energy(window_s=math.nan), ValueError, "window_s must be a finite number >= 1"),
    (lambda: energy(window_s=0.5), ValueError, "window_s must be a finite number >= 1"),
    (lambda: energy(trials=0), ValueError, "trials must be an int >= 1"),
    (lambda: energy(trials=1.5), TypeError, "trials must be an int"),
    (lambda: energy(trials=True), TypeError, "trials must be an int"),
    (lambda: energy(run_for="graph"), TypeError, "run_for must be a callable"),
    (lambda: energy(meter="gpu0"), TypeError, "meter must be a calibration.nvml_meter.GpuMeter"),
    (lambda: energy(run_for=lambda seconds: 0), ValueError, "run_for returned 0 calls"),
    (lambda: energy(run_for=lambda seconds: None), TypeError, "run_for must return the number of calls"),
    (lambda: energy(run_for=lambda seconds: 5), ValueError, "must run the work for at least"),
    (lambda: measure_window(StepMeter(), sleeps(), 1.0, idle_power_w=math.nan), ValueError, "idle_power_w"),
    (lambda: measure_window(StepMeter(), sleeps(), math.inf, idle_power_w=0.0), ValueError, "window_s"),
    (lambda: measure_idle_power_w(StepMeter(), seconds=-1), ValueError, "seconds must be a finite number >= 0"),
    (lambda: measure_idle_power_w(StepMeter(), seconds=math.nan), ValueError, "seconds must be a finite number"),
    (lambda: measure_idle_power_w(StepMeter(), seconds="2"), TypeError, "seconds must be a real number"),
    (lambda: measure_idle_power_w(None), TypeError, "meter must be"),
    (lambda: wait_for_counter_update(StepMeter(), timeout_s=0), ValueError, "timeout_s must be a finite number > 0"),
    (lambda: wait_for_counter_update(StepMeter(), timeout_s=math.nan), ValueError, "timeout_s"),
    (lambda: repeat_for(lambda: None, -1.0), ValueError, "seconds must be a finite number >= 0"),
    (lambda: repeat_for(lambda: None, math.inf), ValueError, "seconds must be a finite number >= 0"),
    (lambda: repeat_for("fn", 1.0), TypeError, "fn must be a callable"),
    (lambda: event_times_ms(lambda: None, 0), ValueError, "repeats must be an int >= 1"),
    (lambda: median_event_ms(lambda: None, 2.0), TypeError, "repeats must be an int"),
    (lambda: measure_gap_power_w(StepMeter(), math.nan), ValueError, "idle_power_w"),
    (lambda: measure_gap_power_w(StepMeter(), 70.0, launch_every_s=0), ValueError, "launch_every_s"),
    (lambda: GraphRunner(lambda: None, target_replay_ms=-1.0), ValueError, "target_replay_ms"),
    (lambda: EagerRunner(None), TypeError, "fn must be a callable"),
])
def test_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_a_counter_running_backwards_is_an_error_not_a_negative_energy():
    with pytest.raises(RuntimeError, match="energy counter went from .* it must advance"):
        energy(meter=StepMeter(step_mj=-100_000))
    with pytest.raises(RuntimeError, match="energy counter went from .* it must advance"):
        measure_idle_power_w(StepMeter(step_mj=-100_000), seconds=0.0)


def test_an_idle_power_above_the_work_is_an_error_not_a_negative_energy():
    """Readings 0.5 s behind the work: the tail charged at 1 kW outweighs the 200 J the counter gained."""
    with pytest.raises(RuntimeError, match="idle power above the board's power under load"):
        energy(meter=StepMeter(lag_s=0.5), idle_power_w=1000.0)


def test_an_impossible_idle_power_is_an_error():
    with pytest.raises(RuntimeError, match="above any board's"):
        measure_idle_power_w(StepMeter(step_mj=10 ** 9), seconds=0.0)


def test_a_counter_that_stops_reading_is_an_error():
    with pytest.raises(RuntimeError, match="stopped reading: counter gone"):
        wait_for_counter_update(StepMeter(none_after=1))


def test_numpy_arguments_are_numbers():
    nvml = FakeNvml(power_w=70.0)
    result = measure_energy(GpuMeter(nvml=nvml), sleeping_runner(nvml, 300.0), idle_power_w=np.float32(70.0),
                            window_s=np.float64(1.0), trials=np.int64(1))
    assert result["energy_j"] > 0 and len(result["window_s"]) == 1


# ---- calibration.priors ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, phrase", [
    (lambda: prior_table("Z100"), ValueError, "no datasheet for GPU 'Z100'; known: A100, H100, H200, V100"),
    (lambda: prior_table(100), TypeError, "gpu must be a GPU name"),
    (lambda: prior_table("H200", {"d_model": 64}), TypeError, "dims must be a costmodel.ops.ModelDims"),
])
def test_prior_table_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_prior_table_at_other_dims():
    table = prior_table("H200", ModelDims(d_model=64, n_heads=2))
    assert table["source"] == "prior" and table["dims"]["d_model"] == 64


def test_an_impossible_memory_utilisation_is_unknown_not_a_pressure_coordinate():
    class Hog:
        share = 0.5

        def start(self, seconds):
            pass

        def wait(self):
            pass

    class UtilMeter:
        def __init__(self, pct):
            self.pct = pct

        def read(self):
            return GpuReading(time_s=time.monotonic(), memory_bandwidth_util_pct=self.pct)
    assert background_utilisation(UtilMeter(40), [Hog()], window_s=0.01) == {0.5: 0.4}
    for pct in (250, -10):
        assert background_utilisation(UtilMeter(pct), [Hog()], window_s=0.01) == {0.5: None}
