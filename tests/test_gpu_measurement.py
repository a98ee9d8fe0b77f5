"""Real measurements on the GPU (skipped without one): one kernel's energy and latency, and the
memory-pressure background stream. The figures must be positive, finite and agree with each other."""
import math
import statistics

import pytest
import torch

from calibration.energy import GraphRunner, measure_energy, measure_idle_power_w, measure_window
from calibration.nvml_meter import BackgroundSampler, GpuMeter
from calibration.pressure import BandwidthHog, background_utilisation, measure_pressure_curve
from calibration.op_calls import op_callable
from costmodel.ops import ModelDims
from tests.conftest import requires_gpu


@pytest.fixture(scope="module")
def meter():
    meter = GpuMeter(torch.cuda.current_device())
    if not meter.available:
        pytest.skip(f"no NVML: {meter.unavailable_reason}")
    return meter


@requires_gpu
def test_kernel_energy_agrees_with_sampled_power_times_time(meter):
    runner = GraphRunner(op_callable("swiglu_ffn", 4096, ModelDims(d_model=1024, d_ff=4096)))
    idle_power_w = measure_idle_power_w(meter, seconds=1.0)
    assert 20.0 < idle_power_w < 300.0
    with BackgroundSampler(meter, interval_s=0.1) as sampler:
        window = measure_window(meter, runner.run_for, 1.5, idle_power_w)
    # instant power: NVML's average field trails by about a second
    sampled_w = statistics.median(s.power_instant_w for s in sampler.samples[2:-2] if s.power_instant_w)
    assert math.isfinite(window.energy_j) and window.energy_j > 0
    # the counter moves in ~100 ms steps: allow one step of busy power plus 15% for NVML's averaging
    assert window.energy_j == pytest.approx(sampled_w * window.duration_s, abs=0.1 * sampled_w + 0.1 * window.energy_j)
    # back-to-back graph replays: calls x latency fills the window
    assert window.calls * runner.latency_ms * 1e-3 == pytest.approx(window.duration_s, rel=0.2)
    result = measure_energy(meter, runner.run_for, idle_power_w, window_s=1.0, trials=2)
    assert 0 < result["energy_j_min"] <= result["energy_j"] <= result["energy_j_max"]
    assert idle_power_w < result["power_w"] < 1000.0


@requires_gpu
def test_background_stream_slows_a_memory_bound_op(meter):
    runner = GraphRunner(op_callable("ffn_down", 64, ModelDims(d_model=4096, d_ff=14336)))  # weight-read bound
    hogs = [BandwidthHog(0.9)]
    background = background_utilisation(meter, hogs)
    points = measure_pressure_curve(meter, runner, hogs, background)
    assert points[0]["stretch"] == 1.0 and points[1]["stretch"] > 1.05
    if background[0.9] is not None:  # NVML reports memory utilisation on this board
        assert background[0.9] > 0.3
