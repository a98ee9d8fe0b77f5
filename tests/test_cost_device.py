"""DeviceCostTable: the host API's predictions as device tensors, with no host sync.

The tables here are synthetic test data (tests.test_cost_model.synthetic_table), never a measurement."""
import pytest
import torch

from calibration.results import write_json_atomic
from costmodel.device import DeviceCostTable
from costmodel.kernel_cost_model import KernelCostModel
from tests.conftest import DEVICE, ON_GPU
from tests.test_cost_model import synthetic_table, with_pressure_curve
from tests.test_cost_model import table_path as table_path  # noqa: F401 (the fixture)


def test_device_table_gives_nan_outside_the_domain_and_checks_kinds(table_path, tmp_path):
    device = DeviceCostTable(KernelCostModel("TESTGPU", table=table_path), ["ffn_gate"], DEVICE)
    batches = torch.tensor([-4.0, 0.0, 16.0], device=DEVICE)
    energy, latency = device.predict("ffn_gate", batches)
    assert energy[:2].isnan().all() and latency[:2].isnan().all() and torch.isfinite(energy[2])
    for kwargs in (dict(temp_c=torch.tensor(-300.0, device=DEVICE)), dict(memory_pressure=torch.tensor(1.5)),
                   dict(memory_pressure=torch.tensor(-0.1))):
        kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
        assert device.predict("ffn_gate", batches[2:], **kwargs)[1].isnan().all(), kwargs
    prior = DeviceCostTable(KernelCostModel("A100"), ["ffn_gate"], DEVICE)  # no pressure curve: the roofline
    assert prior.predict("ffn_gate", batches[2:], memory_pressure=torch.tensor(1.0, device=DEVICE))[1].isnan().all()
    with pytest.raises(ValueError, match="op 'ffn_up' is not carried"):
        device.predict("ffn_up", batches)
    with pytest.raises(TypeError, match="batch_sizes must be a float tensor"):
        device.predict("ffn_gate", 4.0)
    with pytest.raises(TypeError, match="temp_c must be a float tensor"):
        device.predict("ffn_gate", batches, temp_c=60.0)
    with pytest.raises(TypeError, match="ops must be a list of op names"):
        DeviceCostTable(KernelCostModel("TESTGPU", table=table_path), "ffn_gate", DEVICE)
    with pytest.raises(TypeError, match="model must be a KernelCostModel"):
        DeviceCostTable("H100", ["ffn_gate"], DEVICE)


def test_device_table_matches_host(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    device_table = DeviceCostTable(model, ["fused_experts", "moe_router"], DEVICE)
    batches = torch.tensor([1.0, 3.0, 16.0, 100.0, 2000.0], device=DEVICE)
    energy, latency = device_table.predict("fused_experts", batches)
    for b, e, lat in zip(batches.tolist(), energy.tolist(), latency.tolist()):
        host = model.get_cost("fused_experts", b)
        assert e == pytest.approx(host["energy_joules"], rel=1e-5) and lat == pytest.approx(host["latency_ms"], rel=1e-5)


@pytest.mark.parametrize("temp_c, pressure", [(35.0, 0.0), (65.0, 0.3), (92.0, 0.6), (50.0, 0.9)])
def test_device_table_applies_temperature_and_pressure_like_the_host(tmp_path, temp_c, pressure):
    write_json_atomic(tmp_path / "t.json", with_pressure_curve(synthetic_table()))
    model = KernelCostModel("TESTGPU", table=tmp_path / "t.json")
    ops = ["ffn_down", "fused_experts"]  # a measured curve, and the roofline fallback
    device_table = DeviceCostTable(model, ops, DEVICE)
    batches = torch.tensor([1.0, 7.0, 64.0, 3000.0], device=DEVICE)
    temp, pressure_t = torch.tensor(temp_c, device=DEVICE), torch.tensor(pressure, device=DEVICE)
    for op in ops:
        energy, latency = device_table.predict(op, batches, temp_c=temp, memory_pressure=pressure_t)
        for b, e, lat in zip(batches.tolist(), energy.tolist(), latency.tolist()):
            host = model.get_cost(op, b, current_temp=temp_c, memory_pressure=pressure)
            assert lat == pytest.approx(host["latency_ms"], rel=1e-5), (op, b)
            assert e == pytest.approx(host["energy_joules"], rel=1e-5), (op, b)


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture needs a CUDA device (none found)")
def test_device_table_is_graph_capturable(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    device_table = DeviceCostTable(model, ["fused_experts"], "cuda")
    batches = torch.tensor([2.0, 50.0], device="cuda")
    temp, pressure = torch.tensor(80.0, device="cuda"), torch.tensor(0.5, device="cuda")
    device_table.predict("fused_experts", batches, temp_c=temp, memory_pressure=pressure)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        energy, _ = device_table.predict("fused_experts", batches)
        hot_energy, hot_latency = device_table.predict("fused_experts", batches, temp_c=temp, memory_pressure=pressure)
    batches.copy_(torch.tensor([16.0, 64.0], device="cuda"))
    temp.fill_(40.0)
    pressure.fill_(0.0)
    graph.replay()
    assert energy.tolist() == pytest.approx([0.002 * 16 ** 0.8, 0.002 * 64 ** 0.8], rel=1e-5)
    cool = [model.get_cost("fused_experts", b, current_temp=40.0, memory_pressure=0.0)["latency_ms"] for b in (16, 64)]
    assert hot_latency.tolist() == pytest.approx(cool, rel=1e-5) and hot_energy.tolist() == pytest.approx(
        energy.tolist(), rel=1e-5)
