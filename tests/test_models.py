"""The harness's transformer LMs: our kernels against the torch references, and their cost plans."""
import pytest
import torch

from bench.harness.models import TransformerLM
from costmodel.ops import OPS, ModelDims
from tests.conftest import DEVICE, ON_GPU, REL_TOL, rel_error

DIMS = ModelDims(d_model=64, d_ff=96, n_heads=2, seq_len=24, num_experts=4, top_k=2)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_kernels_match_the_reference_model(moe):
    tokens = torch.randint(0, 256, (2, 19), device=DEVICE)  # shorter than the context: odd length
    ours = TransformerLM(DIMS, 2, moe=moe, device=DEVICE)(tokens)
    reference = TransformerLM(DIMS, 2, moe=moe, use_kernels=False, device=DEVICE)(tokens)
    assert ours.shape == (2, 19, 256) and torch.isfinite(ours).all()
    # the reference MoE's experts run on torch._grouped_mm: bf16 on a GPU (fp32 on a CPU)
    assert rel_error(ours, reference) <= (REL_TOL[torch.bfloat16] if moe and ON_GPU else 1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cost_plan_is_table_ops(moe):
    plan = TransformerLM(DIMS, 3, moe=moe).cost_plan(batch_size=5)
    assert all(op in OPS and calls >= 1 for op, _, calls in plan)
    tokens = {op: b for op, b, _ in plan}
    assert tokens["flash_attention"] == 5 and tokens["lm_head"] == 5 * DIMS.seq_len
    assert ("fused_experts" in tokens) == moe and ("swiglu_ffn" in tokens) != moe
    assert dict((op, calls) for op, _, calls in plan)["rms_norm"] == 7 and dict((op, calls) for op, _, calls in plan)["residual_add"] == 10


def test_bad_input():
    model = TransformerLM(DIMS, 1, use_kernels=False)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randint(0, 256, (2, 25)))  # longer than the context
    with pytest.raises(ValueError, match="tokens"):
        model(torch.rand(2, 4))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerLM(DIMS, 0)
