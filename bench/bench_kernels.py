"""pytest-benchmark benchmarks of the dense kernels and their torch peers (bf16, GPU only).

Run with ``pytest --benchmark-only``; ``python -m bench.kernels`` prints the same cases as a
table of ratios. Each case checks correctness against its peer before timing.
"""
from typing import TYPE_CHECKING

import pytest
import torch

from bench import dense_cases
from bench.kernels import rel_error

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device (none found)")
CASES = dense_cases.gpu_cases() if torch.cuda.is_available() else []


def _inputs(case):
    return case.make_inputs("cuda", torch.bfloat16, torch.Generator(device="cuda").manual_seed(0))


def _bench(benchmark, fn, inputs):
    def run() -> None:
        fn(*inputs)
        torch.cuda.synchronize()
    run()  # compile and warm up outside the timed rounds
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ours(benchmark: "BenchmarkFixture", case: dense_cases.DenseCase) -> None:
    inputs = _inputs(case)
    out, ref = case.ours(*inputs), case.peer(*inputs)
    assert rel_error(out, ref) < 2e-2
    benchmark.group = case.name
    _bench(benchmark, case.ours, inputs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_peer(benchmark: "BenchmarkFixture", case: dense_cases.DenseCase) -> None:
    benchmark.group = case.name
    _bench(benchmark, case.peer, _inputs(case))
