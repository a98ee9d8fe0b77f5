"""Zero-copy reads of pinned host state: the probe, the placement rule, and the cost kernels reading it in place."""
import math

import pytest
import torch

import kernels.pinned_state as pinned_state
from costmodel.kernel_cost_model import KernelCostModel
from kernels.cost_bias import cost_curves, expert_cost_bias, expert_cost_bias_reference, ttt_offset_step
from kernels.pinned_state import device_reads_pinned, readable_in_place
from tests.conftest import DEVICE, requires_gpu

WEIGHTS = dict(energy_weight=1.0, latency_weight=0.5, max_shift=0.2, thermal_gain=1.0, thermal_margin_c=15.0)


def test_a_state_on_the_kernels_device_is_read_in_place():
    assert device_reads_pinned("cpu")
    assert readable_in_place(torch.rand(3, device=DEVICE), torch.device(DEVICE))


def test_an_unpinned_host_state_is_not_readable_from_a_gpu():
    assert not readable_in_place(torch.rand(3), torch.device("cuda", 0))


def test_during_a_capture_the_probe_answer_is_the_cached_one_or_no(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(pinned_state, "_probe", lambda index: pytest.fail("probed during a capture"))
    monkeypatch.setattr(pinned_state, "PROBED", {0: True})
    assert device_reads_pinned(torch.device("cuda", 0)), "probed before the capture"
    assert not device_reads_pinned(torch.device("cuda", 1)), "never probed: no"
    assert pinned_state.PROBED == {0: True}, "nothing cached during the capture"


@requires_gpu
def test_this_gpu_reads_pinned_memory_in_place():
    assert device_reads_pinned(DEVICE), "Triton here rejects host pointers: routers fall back to a copy per call"


@requires_gpu
def test_cost_kernels_read_a_pinned_state_as_its_device_copy():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, 16, (9, 2), generator=gen, device=DEVICE, dtype=torch.int32)
    offsets = torch.rand(16, generator=gen, device=DEVICE) * 0.05
    on_device = torch.tensor([81.0, 420.0, 0.6], device=DEVICE)
    host = on_device.cpu().pin_memory()
    expected = expert_cost_bias_reference(ids, curves, on_device, offsets, **WEIGHTS)
    assert torch.allclose(expert_cost_bias(ids, curves, host, offsets, **WEIGHTS), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(expert_cost_bias_reference(ids, curves, host, offsets, **WEIGHTS), expected)


@requires_gpu
def test_an_unpinned_host_state_is_refused_by_name():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    offsets, window = torch.zeros(4, device=DEVICE), torch.rand(2, 4, device=DEVICE)
    unpinned = torch.full((3,), math.nan)
    with pytest.raises(ValueError, match="hardware_state is on cpu"):
        expert_cost_bias(ids, curves, unpinned, offsets, **WEIGHTS)
    with pytest.raises(ValueError, match="hardware_state is on cpu"):
        ttt_offset_step(window, curves, unpinned, offsets, lr=0.1, **WEIGHTS)

