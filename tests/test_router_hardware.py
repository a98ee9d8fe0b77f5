"""EnergyAwareTTTRouter and HardwareMonitor: the cached hardware state and what the cost lookup does with it.

The cost tables are synthetic test data (tests.test_router.decode_table), never a measurement."""
import time
import warnings

import pytest
import torch

from calibration.nvml_meter import GpuMeter
from router import EnergyAwareTTTRouter, HardwareMonitor
from tests.conftest import DEVICE
from tests.fake_nvml import FakeNvml
from tests.test_router import COST, K, batches
from tests.test_router import cost_model as cost_model  # noqa: F401 (the fixture)
from tests.test_router import fake_monitor, router_pair
from tests.test_router import seeded as seeded  # noqa: F401 (the autouse fixture: seeded RNGs)


def test_monitor_caches_and_mirrors_readings():
    monitor, nvml = fake_monitor(power_w=200.0, temperature_c=60)
    assert (monitor.temperature_c, monitor.power_w, monitor.memory_bandwidth_util) == (60.0, 200.0, 0.4)
    assert monitor.host_state.tolist() == pytest.approx([60.0, 200.0, 0.4]) and monitor.slowdown_temp_c == 87
    nvml.temperature_c = 71
    with monitor:
        deadline = time.monotonic() + 2.0
        while monitor.temperature_c != 71.0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert monitor.host_state[0].item() == 71.0 and len(monitor.samples) >= 1


def test_nan_temperature_is_ignored_with_a_warning():
    monitor, nvml = fake_monitor(temperature_c=55)
    nvml.temperature_c = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite temperature"):
        monitor.poll()
    assert monitor.temperature_c == 55.0 and monitor.host_state[0].item() == 55.0
    assert monitor.nan_temperature_readings == 1


def test_without_nvml_the_router_warns_once_and_runs_on_the_cost_model(cost_model):
    monitor = HardwareMonitor(GpuMeter(nvml=FakeNvml(fail_init=True)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain, first = router_pair(cost_model, monitor=monitor)
        second = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST, monitor=monitor)
    messages = [str(w.message) for w in caught if "cost model alone" in str(w.message)]
    assert len(messages) == 1 and "Driver Not Loaded" in messages[0]
    alone = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST)
    x = batches([12])[0]
    for a, b in zip(second(x), alone(x)):
        assert torch.equal(a, b)
    assert first.energy_weight() == 1.0


def test_energy_weight_rises_toward_the_slowdown_threshold(cost_model):
    monitor, nvml = fake_monitor(temperature_c=40)
    _, router = router_pair(cost_model, monitor=monitor, thermal_gain=1.0, thermal_margin_c=15.0)
    x = batches([6])[0]
    one_token = torch.zeros(1, K, dtype=torch.int32, device=DEVICE) + torch.arange(K, device=DEVICE,
                                                                                  dtype=torch.int32)
    weights, biases = [], []
    for temp_c in (40, 80, 95):  # table slowdown 87 C: the ramp runs from 72 C to 87 C
        nvml.temperature_c = temp_c
        monitor.poll()
        router(x)  # the forward copies the cached state to the device
        weights.append(float(router.energy_weight()))
        biases.append(router.cost_bias(one_token)[K].item())  # expert K: idle
    assert weights == pytest.approx([1.0, 1.0 + 8 / 15, 2.0])
    assert biases[0] > biases[1] > biases[2], "hotter: idle experts look dearer"


def test_cost_lookup_uses_the_cached_temperature_and_memory_pressure(cost_model):
    monitor, _ = fake_monitor(temperature_c=65)  # the fake reports 40% memory-bandwidth utilisation
    _, router = router_pair(cost_model, monitor=monitor)
    router(batches([4])[0])
    energy_j, latency_ms = router.expert_cost(torch.tensor([1.0, 5.0], device=DEVICE))
    for b, e, lat in zip((1, 5), energy_j.tolist(), latency_ms.tolist()):
        host = cost_model.get_cost("swiglu_ffn", b, current_temp=65.0, memory_pressure=0.4)
        assert e == pytest.approx(host["energy_joules"], rel=1e-5)
        assert lat == pytest.approx(host["latency_ms"], rel=1e-5)


@pytest.mark.parametrize("call, error, phrase", [
    (lambda r: r.expert_cost([1.0, 5.0]), TypeError, "batch_sizes must be a torch.Tensor"),
    (lambda r: r.expert_cost(None), TypeError, "batch_sizes must be a torch.Tensor"),
    (lambda r: r.expert_cost(torch.ones(2, device="meta")), ValueError, "batch_sizes is on meta"),
    (lambda r: r.cost_bias([[0, 1]]), TypeError, "topk_ids must be a torch.Tensor"),
    (lambda r: r.cost_bias(torch.zeros(2, K, device=DEVICE)), TypeError, "topk_ids has dtype torch.float32"),
    (lambda r: r.cost_bias(torch.zeros(K, dtype=torch.int32, device=DEVICE)), ValueError,
     "topk_ids must have 2 dimensions"),
], ids=["cost-list", "cost-none", "cost-other-device", "bias-list", "bias-float-ids", "bias-1d-ids"])
def test_cost_lookups_check_their_arguments(cost_model, call, error, phrase):
    _, router = router_pair(cost_model)
    with pytest.raises(error, match=phrase):
        call(router)


# ---- expert placement ----------------------------------------------------------------------------
