"""The NVML meter and its background sampler, on a scripted fake NVML."""
import time

import numpy as np
import pytest
import torch

from calibration.nvml_meter import BackgroundSampler, GpuMeter, meter_for_cuda_device
from tests.fake_nvml import FakeNvml


def test_reading_has_every_field():
    meter = GpuMeter(nvml=FakeNvml(power_w=200.0, temperature_c=51))
    reading = meter.read()
    assert reading.missing == {}
    assert reading.power_instant_w == reading.power_average_w == 200.0
    assert reading.temperature_c == 51.0 and reading.sm_clock_mhz == 1980 and reading.mem_clock_mhz == 2619
    assert reading.memory_used_bytes == 3 * 2 ** 30 and reading.memory_bandwidth_util_pct == 40
    assert reading.clock_event_reasons == 0 and reading.energy_mj >= 0
    assert meter.name() == "NVIDIA H100 80GB HBM3" and meter.driver_version() == "580.159.04"
    assert meter.temperature_thresholds_c() == {"slowdown": 87, "shutdown": 92, "missing": {}}


def test_unsupported_query_is_none_with_its_reason():
    reading = GpuMeter(nvml=FakeNvml(unsupported={"nvmlDeviceGetTotalEnergyConsumption",
                                                  "nvmlDeviceGetFieldValues"})).read()
    assert reading.energy_mj is None and "NotSupported" in reading.missing["energy_mj"]
    assert reading.power_instant_w is None and reading.power_average_w is None
    assert "nvmlDeviceGetFieldValues" in reading.missing["power_average_w"]
    assert reading.temperature_c == 45.0, "the other fields still read"


def test_without_nvml_every_figure_is_none_with_the_reason():
    meter = GpuMeter(nvml=FakeNvml(fail_init=True))
    assert not meter.available and "Driver Not Loaded" in meter.unavailable_reason
    reading = meter.read()
    assert all(getattr(reading, f) is None for f in reading.missing)
    assert len(reading.missing) == 9 and set(reading.missing.values()) == {meter.unavailable_reason}
    assert meter.name() is None and meter.temperature_thresholds_c()["slowdown"] is None


def test_energy_counter_moves_in_100ms_steps():
    nvml = FakeNvml(power_w=100.0)
    meter = GpuMeter(nvml=nvml)
    first = meter.read().energy_mj
    time.sleep(0.35)
    delta_mj = meter.read().energy_mj - first
    assert delta_mj % 10000 == 0 and 20000 <= delta_mj <= 40000  # 100 W x 0.1 s steps = 10 J = 10000 mJ


def test_slowdown_reasons_decoded():
    nvml = FakeNvml()
    meter = GpuMeter(nvml=nvml)
    bits = nvml.nvmlClocksEventReasonSwThermalSlowdown | nvml.nvmlClocksEventReasonGpuIdle
    assert meter.slowdown_reasons(bits) == ["sw_thermal_slowdown"]
    assert meter.slowdown_reasons(0) == [] and meter.slowdown_reasons(None) is None


def test_background_sampler_records_a_timeline():
    nvml = FakeNvml(power_w=120.0)
    with BackgroundSampler(GpuMeter(nvml=nvml), interval_s=0.1) as sampler:
        time.sleep(0.45)
        nvml.temperature_c = 60
        time.sleep(0.15)
    samples = sampler.samples
    assert 4 <= len(samples) <= 8
    assert all(b.time_s > a.time_s for a, b in zip(samples, samples[1:]))
    assert samples[0].temperature_c == 45.0 and sampler.latest.temperature_c == 60.0


@pytest.mark.parametrize("bad", [0.05, 0, -1, float("nan"), float("inf")])
def test_sampler_rejects_faster_than_10hz(bad):
    with pytest.raises(ValueError, match="interval_s"):
        BackgroundSampler(GpuMeter(nvml=FakeNvml()), interval_s=bad)


def test_meter_takes_a_numpy_device_index():
    assert GpuMeter(device_index=np.int64(0), nvml=FakeNvml()).device_index == 0


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: GpuMeter(device_index=-1, nvml=FakeNvml()), ValueError, "device_index must be an int >= 0"),
    (lambda: GpuMeter(device_index=1.5, nvml=FakeNvml()), TypeError, "device_index must be an int"),
    (lambda: GpuMeter(device_index=True, nvml=FakeNvml()), TypeError, "device_index must be an int"),
    (lambda: GpuMeter(device_index="0", nvml=FakeNvml()), TypeError, "device_index must be an int"),
    (lambda: BackgroundSampler(GpuMeter(nvml=FakeNvml()), interval_s="1"), TypeError, "interval_s must be a real"),
    (lambda: BackgroundSampler(GpuMeter(nvml=FakeNvml()), interval_s=True), TypeError, "interval_s must be a real"),
    (lambda: BackgroundSampler("gpu0"), TypeError, "meter must be a calibration.nvml_meter.GpuMeter"),
    (lambda: GpuMeter(nvml=FakeNvml()).slowdown_reasons("0x20"), TypeError, "bits must be an int"),
    (lambda: GpuMeter(nvml=FakeNvml()).slowdown_reasons(-1), ValueError, "bits must be NVML's clock-event"),
    (lambda: GpuMeter(nvml="pynvml"), TypeError, "nvml must be the pynvml module"),  # was: unavailable, silently
    (lambda: GpuMeter(nvml=0), TypeError, "nvml must be the pynvml module"),  # was: the real pynvml instead
], ids=["index<0", "index-float", "index-bool", "index-str", "interval-str", "interval-bool", "meter-str", "bits-str",
        "bits-negative", "nvml-str", "nvml-zero"])
def test_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_a_sampler_runs_once():
    sampler = BackgroundSampler(GpuMeter(nvml=FakeNvml()))
    sampler.start().stop()
    with pytest.raises(RuntimeError, match="make a new one"):
        sampler.start()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_no_cuda_device_has_no_meter_to_find():
    with pytest.raises(ValueError, match=r"no CUDA device \(torch.cuda.is_available\(\) is False\)"):
        meter_for_cuda_device()
