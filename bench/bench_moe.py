"""pytest-benchmark benchmarks of the fused MoE experts and their peers (bf16, GPU only).

``python -m bench.moe`` prints the full ladder of token counts as a table of ratios."""
from typing import TYPE_CHECKING

import pytest
import torch

from bench import moe_cases
from bench.kernels import rel_error

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device (none found)")
CASES = [("mixtral", 1), ("mixtral", 16), ("mixtral", 1024), ("mixtral", 4096), ("qwen3", 1), ("qwen3", 8192)]
IMPLS = {"ours": moe_cases.ours, "grouped_mm": moe_cases.grouped_mm}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, T", CASES, ids=[f"{s}-T{t}" for s, t in CASES])
def test_fused_moe(benchmark: "BenchmarkFixture", shape: str, T: int, impl: str) -> None:
    inputs = moe_cases.make_inputs(moe_cases.SHAPES[shape], T, "cuda", torch.bfloat16)
    out, ref = IMPLS[impl](*inputs), moe_cases.hf_loop(*inputs)
    assert rel_error(out, ref) < 2e-2

    def run() -> None:
        IMPLS[impl](*inputs)
        torch.cuda.synchronize()
    benchmark.group = f"fused_moe {shape} T{T}"
    benchmark.pedantic(run, rounds=20, iterations=3, warmup_rounds=2)
