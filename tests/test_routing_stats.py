"""The router's one-launch tallies against their torch reference."""
import pytest
import torch

from kernels.routing_stats import STAT_FIELDS, routing_tallies, routing_tallies_reference
from tests.conftest import DEVICE


def random_ids(T, K, E, gen):
    if T == 0:
        return torch.empty(0, K, dtype=torch.int32, device=DEVICE)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE, torch.int32)


@pytest.mark.parametrize("T, K, E", [(0, 2, 4), (1, 1, 3), (37, 2, 5), (300, 3, 8), (9, 8, 128), (5, 4, 4)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_kernel_matches_reference_and_accumulates(T, K, E, index_dtype):
    gen = torch.Generator().manual_seed(T * 131 + E)
    plain = random_ids(T, K, E, gen).to(index_dtype)
    chosen = random_ids(T, K, E, gen).to(index_dtype)
    chosen[::2] = plain[::2]  # half the tokens keep their plain experts
    weights = torch.rand(T, K, generator=gen).to(DEVICE)
    weights[::3, 0] = 0.0
    nan_tokens = torch.tensor([T // 4], dtype=torch.int32, device=DEVICE)
    stats = torch.randint(0, 100, (len(STAT_FIELDS),), generator=gen).to(DEVICE)  # earlier totals
    window = torch.rand(2, E, generator=gen).to(DEVICE)
    before_stats, before_window = stats.clone(), window.clone()
    routing_tallies(plain, chosen, weights, nan_tokens, E, stats=stats, window=window)
    add_stats, add_window = routing_tallies_reference(plain, chosen, weights, nan_tokens, E)
    assert torch.equal(stats, before_stats + add_stats)
    assert torch.equal(window, before_window + add_window)
    assert add_stats[STAT_FIELDS.index("tokens")] == T


def test_counts_by_hand():
    plain = torch.tensor([[0, 1], [2, 3], [0, 2]], device=DEVICE)
    chosen = torch.tensor([[1, 0], [2, 0], [3, 1]], device=DEVICE)  # token 0 reordered, 1 one swap, 2 two
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]], device=DEVICE)
    stats = torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=DEVICE)
    window = torch.zeros(2, 5, device=DEVICE)
    routing_tallies(plain, chosen, weights, torch.tensor([1], dtype=torch.int32, device=DEVICE), 5, stats, window)
    assert dict(zip(STAT_FIELDS, stats.tolist())) == {
        "calls": 1, "tokens": 3, "rerouted_tokens": 2, "changed_slots": 3, "distinct_experts": 4,
        "plain_distinct_experts": 4, "nan_tokens": 1, "active_slots": 5}
    assert window.tolist() == [[2.0, 2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("K", [1, 3])  # K=3: the kernel pads K to 4 lanes, which must never match a bad id
def test_invalid_ids_are_neither_kept_nor_changed(K):
    plain = torch.tensor([[0, 1, 2][:K], [-1, 1, 2][:K], [99, 1, 2][:K]], device=DEVICE)
    chosen = torch.tensor([[-1, 1, 2][:K], [-1, 1, 2][:K], [3, 1, 2][:K]], device=DEVICE)
    weights, nan_tokens = torch.ones(3, K, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE)
    stats = torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=DEVICE)
    routing_tallies(plain, chosen, weights, nan_tokens, 4, stats=stats)
    expected, _ = routing_tallies_reference(plain, chosen, weights, nan_tokens, 4)
    assert stats.tolist() == expected.tolist()
    fields = dict(zip(STAT_FIELDS, stats.tolist()))
    assert fields["changed_slots"] == fields["rerouted_tokens"] == 1, "only token 2's slot moved, to expert 3"


def test_only_the_given_outputs_change_and_bad_ids_count_as_no_expert():
    plain = torch.tensor([[0, 7]], device=DEVICE)  # 7 is out of range for E = 4
    window = torch.zeros(2, 4, device=DEVICE)
    routing_tallies(plain, plain, torch.ones(1, 2, device=DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE),
                    4, window=window)
    assert window.tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def good_args():
    ids = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    return dict(plain_ids=ids, topk_ids=ids.clone(), weights=torch.ones(3, 2, device=DEVICE),
                nan_tokens=torch.zeros(1, dtype=torch.int32, device=DEVICE), num_experts=4,
                stats=torch.zeros(8, dtype=torch.int64, device=DEVICE), window=torch.zeros(2, 4, device=DEVICE))


@pytest.mark.parametrize("name, value, error", [
    ("plain_ids", torch.zeros(3, 2), TypeError),
    ("topk_ids", torch.zeros(3, 2, 1, dtype=torch.int32), ValueError),
    ("weights", torch.ones(3, 3), ValueError),
    ("weights", [[1.0, 1.0]] * 3, TypeError),
    ("nan_tokens", torch.zeros(2, dtype=torch.int32), ValueError),
    ("num_experts", 0, ValueError),
    ("num_experts", 4.0, TypeError),
    ("stats", torch.zeros(8, dtype=torch.int32), TypeError),
    ("stats", torch.zeros(7, dtype=torch.int64), ValueError),
    ("window", torch.zeros(2, 5), ValueError),
    ("window", torch.zeros(5, 2).T, ValueError),
    ("topk_ids", torch.zeros(3, 0, dtype=torch.int32), ValueError),
])
def test_bad_input_names_the_argument(name, value, error):
    args = good_args()
    if isinstance(value, torch.Tensor):
        value = value.to(DEVICE)
    args[name] = value
    with pytest.raises(error, match=name):
        routing_tallies(**args)
