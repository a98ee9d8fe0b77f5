"""Energy windows on a fake counter that, like the H100's, updates every 100 ms."""
import json
import math
import time

import numpy as np
import pytest
import torch

from calibration.energy import (EagerRunner, GraphRunner, event_times_ms, measure_energy, measure_gap_power_w,
                                measure_idle_power_w, measure_window, median_event_ms, repeat_for,
                                wait_for_counter_update)
from calibration.nvml_meter import GpuMeter, GpuReading
from calibration.pressure import BandwidthHog, background_utilisation, measure_pressure_curve
from calibration.op_calls import op_callable
from calibration.priors import DATASHEETS, prior_point, prior_table
from calibration.results import write_json_atomic
from calibration.sweep import SweepSettings, calibrate_ops, gpu_matches, partial_path, progress
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


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: prior_point("swiglu_ffn", 0, ModelDims(), DATASHEETS["H100"]), ValueError, "batch_size must be an int >="),
    (lambda: prior_point("swiglu_ffn", 1.5, ModelDims(), DATASHEETS["H100"]), TypeError, "batch_size must be an int"),
    (lambda: prior_point("swiglu_ffn", 1, None, DATASHEETS["H100"]), TypeError, "dims must be a costmodel.ops"),
    (lambda: prior_point("swiglu_ffn", 1, ModelDims(), "H100"), TypeError, "sheet must be a dict"),
    (lambda: prior_point("swiglu_ffn", 1, ModelDims(), DATASHEETS["H100"] | {"tdp_w": math.nan}), ValueError,
     r"sheet\['tdp_w'\] must be a finite number > 0"),
    (lambda: prior_point("expert_ffn_fp8", 1, ModelDims(), DATASHEETS["A100"]), TypeError,
     r"sheet\['fp8_peak_tflops'\] must be a real number"),
], ids=["batch-0", "batch-float", "dims-none", "sheet-str", "tdp-nan", "fp8-on-a100"])
def test_prior_point_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


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


# ---- calibration.sweep's settings, calibration.results and calibration.op_calls ---------------------

def settings(tmp_path, **kwargs):
    return SweepSettings(**dict(gpu="H100", dims=ModelDims(), ops=("swiglu_ffn",), output=tmp_path / "H100.json")
                         | kwargs)


@pytest.mark.parametrize("kwargs, error, phrase", [
    (dict(gpu=""), ValueError, "gpu must be a short GPU name"),
    (dict(gpu=None), ValueError, "gpu must be a short GPU name"),
    (dict(dims={"d_model": 256}), TypeError, "dims must hold costmodel.ops.ModelDims"),
    (dict(ops="swiglu_ffn"), TypeError, "ops must be a tuple"),  # was: swept as the ops 's', 'w', 'i', ...
    (dict(ops=()), ValueError, "ops must be distinct ops of costmodel.ops.OPS"),
    (dict(ops=("swiglu",)), ValueError, "ops must be distinct ops of costmodel.ops.OPS"),
    (dict(ops=("swiglu_ffn", "swiglu_ffn")), ValueError, "ops must be distinct"),
    (dict(output=None), TypeError, "output must be a file path"),
    (dict(window_s=0.5), ValueError, "window_s must be a finite number >= 1"),
    (dict(trials=0), ValueError, "trials must be an int >= 1"),
    (dict(trials=1.5), TypeError, "trials must be an int"),
    (dict(pressure_shares=(1.5,)), ValueError, "pressure_shares must be a finite number in"),
    (dict(pressure_shares=0.5), TypeError, "pressure_shares must be a tuple"),
    (dict(shapes=None), TypeError, "shapes must be a tuple"),
    (dict(latency_shapes=({"d_model": 768},)), TypeError, "latency_shapes must hold costmodel.ops.ModelDims"),
], ids=["gpu-empty", "gpu-none", "dims-dict", "ops-str", "ops-empty", "ops-unknown", "ops-repeated", "output-none",
        "window-short", "trials-0", "trials-float", "share-1.5", "shares-float", "shapes-none", "latency-shape-dict"])
def test_sweep_settings_are_checked_before_anything_is_measured(tmp_path, kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        settings(tmp_path, **kwargs)


def test_sweep_settings_take_plain_paths_lists_and_numpy_numbers(tmp_path):
    checked = settings(tmp_path, output=str(tmp_path / "H100.json"), ops=["swiglu_ffn"], trials=np.int64(2),
                       trace=str(tmp_path / "trace.json"), shapes=[])
    assert checked.output == tmp_path / "H100.json" and checked.trace == tmp_path / "trace.json"
    assert checked.ops == ("swiglu_ffn",) and checked.shapes == () and type(checked.trials) is int
    assert partial_path(str(tmp_path / "H100.json")) == tmp_path / "H100.partial.json"
    with pytest.raises(ValueError, match="output .* is a directory"):
        settings(tmp_path, output=tmp_path)


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: gpu_matches("", "NVIDIA A100-SXM4-80GB"), ValueError, "requested must be a GPU name"),  # was: True
    (lambda: gpu_matches(None, "NVIDIA A100-SXM4-80GB"), ValueError, "requested must be a GPU name"),
    (lambda: gpu_matches("A100", None), TypeError, "detected_name must be the GPU's NVML name"),
    (lambda: progress(0, 0, "op", 1.0), ValueError, "total must be an int >= 1"),  # was: ZeroDivisionError
    (lambda: progress(5, 3, "op", 1.0), ValueError, r"n must be an int in \[0, total = 3\]"),
], ids=["gpu-empty", "gpu-none", "detected-none", "total-0", "n-past-total"])
def test_sweep_helpers_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_calibrate_ops_without_a_gpu_says_so(tmp_path):
    with pytest.raises(ValueError, match="ops must be distinct ops"):
        calibrate_ops("H100", ("swiglu",), ModelDims(), tmp_path / "H100.json")
    with pytest.raises(ValueError, match=r"no NVIDIA GPU detected"):  # was: torch's AssertionError
        calibrate_ops("H100", ("swiglu_ffn",), ModelDims(), tmp_path / "H100.json")


@pytest.mark.parametrize("path, data, error, phrase", [
    (None, {}, TypeError, "path must be a file path"),
    ("", {}, ValueError, "is a directory"),
    ("dir", {}, ValueError, "is a directory"),
    ("inf.json", [math.inf], ValueError, "is not strict JSON .*'\\[0\\]': 'inf'"),
    ("tensor.json", {"x": torch.ones(1)}, TypeError, "is not JSON .*Tensor"),
], ids=["none", "empty", "directory", "inf-in-a-list", "tensor"])
def test_write_json_atomic_refuses_what_is_not_a_json_file(tmp_path, path, data, error, phrase):
    (tmp_path / "dir").mkdir()
    with pytest.raises(error, match=phrase):
        write_json_atomic(tmp_path / path if path else path, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"], "nothing written, no temp file left"


def test_write_json_atomic_writes_non_finite_values_as_null_and_names_them(tmp_path):
    """A long GPU run keeps its results: NaN and Infinity become null, each named with its value."""
    data = {"energy_j": math.nan, "rows": [{"kl": math.inf}, {"kl": 0.5}], "n": 3}
    with pytest.warns(UserWarning, match="non-finite values written as null"):
        write_json_atomic(tmp_path / "r.json", data)
    written = json.loads((tmp_path / "r.json").read_text())  # strict: json.loads would read NaN too, so check
    assert "NaN" not in (tmp_path / "r.json").read_text() and "Infinity" not in (tmp_path / "r.json").read_text()
    assert written == {"energy_j": None, "rows": [{"kl": None}, {"kl": 0.5}], "n": 3,
                       "non_finite_values": {"energy_j": "nan", "rows[0].kl": "inf"}}
    assert data["energy_j"] != data["energy_j"], "the caller's data is left as it was"


@pytest.mark.parametrize("kwargs, error, phrase", [
    (dict(op="swiglu"), ValueError, "unknown op 'swiglu'"),  # was: a KeyError after allocating its tensors
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(dims=None), TypeError, "dims must be a costmodel.ops.ModelDims"),
], ids=["op-unknown", "batch-0", "batch-float", "dims-none"])
def test_op_callable_bad_input(kwargs, error, phrase):
    args = dict(op="swiglu_ffn", batch_size=4, dims=ModelDims(), device="cpu", dtype=torch.float32) | kwargs
    with pytest.raises(error, match=phrase):
        op_callable(**args)
