"""Programmatic dependent launch: when it is on, and that the decode chain it overlaps computes the same bits."""
import pytest
import torch

import kernels
from kernels.dependent_launch import PDL_ENV, dependent_launch
from kernels.quantize import launch_quantize_fp8
from tests.conftest import ON_GPU, randn

HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9
requires_hopper = pytest.mark.skipif(not HOPPER, reason="PDL needs a CUDA GPU of compute capability >= 9.0")


def test_pdl_is_off_on_the_cpu_and_when_the_environment_says_so(monkeypatch):
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert dependent_launch(torch.device("cpu")) is False
    if ON_GPU:
        assert dependent_launch(torch.device("cuda")) is HOPPER
    monkeypatch.setenv(PDL_ENV, "0")
    assert dependent_launch(torch.device("cuda")) is False
    with pytest.raises(TypeError, match="device must be a torch.device, got str"):
        dependent_launch("cuda")


def decode_chain(x, gate_up, down, ids, weights):
    """The kernels a decode MoE call launches back to back: the layout or none, two expert GEMMs,
    the slot sum; then an FP8 quantization that reads the sum."""
    out = kernels.fused_experts(x, gate_up, down, ids, weights, validate_ids=False)
    q, scale = launch_quantize_fp8(out)
    return out, q.float(), scale


@requires_hopper
@pytest.mark.parametrize("T", [1, 3, 16])
def test_the_chain_computes_the_same_bits_with_and_without_pdl_eager_and_in_a_graph(T, monkeypatch):
    E, H, I, K = 64, 512, 384, 8
    gen = torch.Generator().manual_seed(T)
    x = randn(T, H, dtype=torch.bfloat16, generator=gen)
    gate_up = randn(E, 2 * I, H, dtype=torch.bfloat16, scale=H ** -0.5, generator=gen)
    down = randn(E, H, I, dtype=torch.bfloat16, scale=I ** -0.5, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).cuda()
    weights = torch.rand(T, K, generator=gen).cuda()
    monkeypatch.setenv(PDL_ENV, "0")
    expected = decode_chain(x, gate_up, down, ids, weights)
    monkeypatch.delenv(PDL_ENV)
    eager = decode_chain(x, gate_up, down, ids, weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_chain(x, gate_up, down, ids, weights)
    for out in captured:
        out.fill_(float("nan"))  # poisoned: the replay must overwrite every element
    graph.replay()
    torch.cuda.synchronize()
    for got in (eager, captured):
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
