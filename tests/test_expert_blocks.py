"""kernels.expert_blocks: both builds of the expert-grouped layout against the torch reference."""
import pytest
import torch

from kernels.expert_blocks import ONE_LAUNCH_SLOTS, group_by_expert, group_by_expert_reference
from tests.conftest import DEVICE

UNWRITTEN = -77  # what every new int32 buffer holds before the kernels write it


@pytest.fixture(autouse=True)
def poison_int_allocations(monkeypatch):
    """New integer buffers start as UNWRITTEN (conftest poisons float ones), so an element a build
    leaves unwritten differs from the reference."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t if t.is_floating_point() else t.fill_(UNWRITTEN)
    monkeypatch.setattr(torch, "empty", poisoned)


def routed_ids(case, T, E, K):
    """[T, K] ids of one test case (distinct experts per token unless said)."""
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEVICE, torch.int32)
    if case == "one-expert":
        return torch.full((T, 1), E - 1, dtype=torch.int32, device=DEVICE)
    if case == "empty-experts":  # experts 3.. get nothing
        ids = ids % 3
        ids[:, -1] = (ids[:, 0] + 1) % 3
    elif case == "dropped-ids":  # an expert-parallel rank's share: other ranks' ids are dropped
        ids = ids.long()
        ids[::3, 0] -= E
        ids[1::3, -1] += E
    elif case == "all-dropped":
        ids = ids.long() + E
    return ids


def runs_sorted(blocks, E):
    """sorted_slots with each expert's run in slot order (the grid build places a run's slots by atomics)."""
    slots = blocks.sorted_slots.long().cpu()
    ends = blocks.expert_counts.long().cpu().add(blocks.block_m - 1).div(blocks.block_m, rounding_mode="floor")
    ends = (ends * blocks.block_m).cumsum(0)
    expert_of_row = torch.bucketize(torch.arange(slots.numel()), ends, right=True)
    return slots[torch.argsort(expert_of_row * (blocks.n_slots + 1) + slots, stable=True)]


@pytest.mark.parametrize("case", ["random", "one-expert", "empty-experts", "dropped-ids", "all-dropped", "T0"])
@pytest.mark.parametrize("block_m", [16, 128])
@pytest.mark.parametrize("T, E, K", [(45, 8, 2), (ONE_LAUNCH_SLOTS // 2, 8, 2), (ONE_LAUNCH_SLOTS // 2 + 1, 8, 2),
                                     (301, 8, 2), (7, 130, 3), (200, 130, 3), (33, 1, 1), (32, 256, 8)],
                         ids=["small", "one-launch-max", "grid-min", "grid", "odd-E", "odd-E-grid", "one-expert-E",
                              "wide-E-one-launch-max"])
def test_both_builds_match_the_reference(case, block_m, T, E, K):
    """Up to ONE_LAUNCH_SLOTS slots one launch builds the layout exactly as the reference (slot
    order in a run); above, the grid build gives the same runs in any order inside each."""
    ids = routed_ids(case, T, E, K)[: 0 if case == "T0" else T]
    blocks, ref = group_by_expert(ids, E, block_m), group_by_expert_reference(ids, E, block_m)
    assert (blocks.block_m, blocks.n_slots) == (ref.block_m, ref.n_slots) == (block_m, ids.numel())
    for name in ("expert_counts", "num_padded", "block_experts"):
        assert torch.equal(getattr(blocks, name).cpu(), getattr(ref, name).cpu()), name
    if ids.numel() <= ONE_LAUNCH_SLOTS:
        assert torch.equal(blocks.sorted_slots.cpu(), ref.sorted_slots.cpu())
    else:
        assert torch.equal(runs_sorted(blocks, E), ref.sorted_slots.long().cpu())


def test_the_reference_layout():
    """The reference itself, by hand: experts 2 and 0 of 3, block_m 2, one id dropped."""
    ids = torch.tensor([[2, 0], [2, 5]], device=DEVICE)  # slots 0..3; slot 3 (id 5) is dropped
    ref = group_by_expert_reference(ids, 3, 2)
    assert ref.expert_counts.tolist() == [1, 0, 2] and ref.num_padded.tolist() == [4]
    assert ref.sorted_slots.tolist() == [1, 4, 0, 2, 4, 4, 4]  # 4 + 3 * (2 - 1) rows; 4 = n_slots: padding
    assert ref.block_experts.tolist() == [0, 2, 3, 3]
