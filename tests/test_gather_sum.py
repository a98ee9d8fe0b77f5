"""The gathered-row sum against its torch reference, and the fused experts' dropped slots."""
import pytest
import torch

import kernels
from kernels.fused_experts import fused_experts_reference, launch_fused_experts
from kernels.gather_sum import gather_sum, gather_sum_reference, launch_gather_sum
from tests.conftest import DEVICE, DTYPES, assert_matches, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, H, T, J", [(5, 3, 4, 2), (40, 33, 17, 8), (1, 300, 3, 1), (0, 8, 3, 2), (7, 8, 0, 3),
                                        (9, 1, 6, 4)])
def test_matches_reference(N, H, T, J, dtype):
    rows = randn(N, H, dtype=dtype)
    index = torch.randint(-1, max(N, 1), (T, J)) if N else torch.full((T, J), -1)
    index = index.to(DEVICE)
    out = gather_sum(rows, index)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = gather_sum_reference(rows.double(), index)
    assert_matches(out, ref, dtype)
    assert (out[(index < 0).all(1)] == 0).all(), "a token with no rows sums to zero"


def test_never_reads_skipped_rows():
    rows = torch.full((4, 16), float("nan"), device=DEVICE)
    rows[1], rows[3] = 1.5, -2.0
    out = gather_sum(rows, torch.tensor([[1, -1, 3], [-1, -1, -1], [3, 3, -5]], device=DEVICE))
    assert out.tolist() == [[-0.5] * 16, [0.0] * 16, [-4.0] * 16]


def test_no_entries_gives_zeros():
    out = launch_gather_sum(randn(3, 5), torch.empty(4, 0, dtype=torch.long, device=DEVICE))
    assert torch.equal(out, torch.zeros(4, 5, device=DEVICE))


@pytest.mark.parametrize("name, rows, index, error", [
    ("rows", lambda: randn(3, 4).long(), lambda: torch.zeros(2, 1, dtype=torch.long), TypeError),
    ("rows", lambda: randn(3), lambda: torch.zeros(2, 1, dtype=torch.long), ValueError),
    ("rows", lambda: randn(4, 3).T, lambda: torch.zeros(2, 1, dtype=torch.long), ValueError),
    ("index", lambda: randn(3, 4), lambda: torch.zeros(2, 1), TypeError),
    ("index", lambda: randn(3, 4), lambda: torch.zeros(2, dtype=torch.long), ValueError),
    ("index", lambda: randn(3, 4), lambda: torch.full((2, 1), 3, dtype=torch.long), ValueError),
])
def test_bad_input_names_the_argument(name, rows, index, error):
    with pytest.raises(error, match=name):
        gather_sum(rows(), index().to(DEVICE))


@pytest.mark.parametrize("K", [1, 3])
def test_fused_experts_drop_out_of_range_ids(K):
    """Ids outside [0, E) contribute nothing (what expert parallelism sends for remote experts)."""
    T, H, I, E = 23, 32, 24, 4
    x = randn(T, H)
    gate_up, down = randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5)
    ids = torch.randint(0, E + 2, (T, K), device=DEVICE)  # ids E and E + 1: dropped
    ids[0] = E  # a token with every slot dropped
    weights = torch.rand(T, K, device=DEVICE)
    out = launch_fused_experts(x, gate_up, down, ids, weights)
    ref = fused_experts_reference(x.double(), gate_up.double(), down.double(), ids, weights.double())
    assert_matches(out, ref, torch.float32)
    assert torch.equal(out[0], torch.zeros(H, device=DEVICE))
    with pytest.raises(ValueError, match="top_k_index"):
        kernels.fused_experts(x, gate_up, down, ids, weights)  # the validated path still refuses them


def test_gradients_reach_the_rows():
    rows = randn(5, 7).requires_grad_()
    index = torch.tensor([[0, -1, 3], [4, 4, 1]], device=DEVICE)
    out = gather_sum(rows, index)
    assert out.requires_grad
    grad_out = randn(2, 7)
    (ours,) = torch.autograd.grad(out, rows, grad_out)
    (ref,) = torch.autograd.grad(gather_sum_reference(rows, index), rows, grad_out)
    assert torch.allclose(ours, ref)
