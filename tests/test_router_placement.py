"""EnergyAwareTTTRouter's expert placement (router.placement): remote experts cost their exchange.

The cost tables are synthetic test data (tests.test_router.decode_table), never a measurement."""
import pytest
import torch

from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from router import EnergyAwareTTTRouter
from tests.conftest import DEVICE
from tests.test_router import COMM_J_PER_BYTE, COMM_MS_PER_BYTE, COST, E, H, K, batches
from tests.test_router import cost_model as cost_model  # noqa: F401 (the fixture)
from tests.test_router import decode_table, router_pair
from tests.test_router import seeded as seeded  # noqa: F401 (the autouse fixture: seeded RNGs)


def test_placement_charges_remote_experts_the_exchange(cost_model):
    """Rank 1 of 2 owns experts 4..7: 0..3 pay two rows (d_model bf16) of remote bytes per token; a
    remote byte costs the curve's energy slope / (W-1) and its latency slope x W/(W-1), W = 2."""
    _, router = router_pair(cost_model, expert_placement=(1, 2))
    per_token = 2 * H * 2 * torch.tensor([[COMM_J_PER_BYTE], [COMM_MS_PER_BYTE * 2]])
    expected = torch.cat((per_token.expand(2, 4), torch.zeros(2, 4)), dim=1)
    assert router.extra_cost.dtype == torch.float32 and router.extra_cost.device == router.weight.device
    assert torch.allclose(router.extra_cost.cpu(), expected, rtol=1e-6)
    router.half()  # follows the router's device, and stays float32
    assert router.extra_cost.dtype == torch.float32 and router.extra_cost.device == router.weight.device
    _, alone = router_pair(cost_model, expert_placement=(0, 1))
    assert (alone.extra_cost == 0).all(), "one rank: every expert is local"


def test_remote_experts_get_a_more_negative_bias(cost_model):
    plain, placed = router_pair(cost_model, expert_placement=(0, 2))  # local 0..3, remote 4..7
    unplaced = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST)
    ids = torch.tensor([[0, 4], [1, 5], [1, 5]], dtype=torch.int32, device=DEVICE)  # alike loads, local vs remote
    bias, bias_unplaced = placed.cost_bias(ids), unplaced.cost_bias(ids)
    for local, remote in ((0, 4), (1, 5), (2, 6)):  # singleton, busy, idle
        assert bias_unplaced[local] == bias_unplaced[remote]
        assert bias[remote] < bias[local] == bias_unplaced[local]


def test_placement_keeps_tokens_on_local_experts(cost_model):
    plain, placed = router_pair(cost_model, expert_placement=(0, 2), ttt_update_frequency=12, energy_aware_lr=0.01)
    unplaced = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST)
    remote_slots = {"placed": 0, "unplaced": 0}
    for x in batches([6] * 6, seed=4):
        remote_slots["placed"] += int((placed(x)[2] >= E // 2).sum())
        remote_slots["unplaced"] += int((unplaced(x)[2] >= E // 2).sum())
    assert placed.ttt_updates >= 2, "the offset step ran with the extra cost"
    assert remote_slots["placed"] < remote_slots["unplaced"], remote_slots


BAD_PLACEMENT = [
    (r"expert_placement: num_experts \(8\) must be a multiple of world_size \(3\)", dict(expert_placement=(0, 3)), ValueError),
    (r"expert_placement .*0 <= rank < world_size", dict(expert_placement=(2, 2)), ValueError),
    (r"expert_placement .*0 <= rank < world_size", dict(expert_placement=(-1, 2)), ValueError),
    (r"expert_placement must be None or \(rank, world_size\)", dict(expert_placement=(0,)), ValueError),
    (r"expert_placement must be None or \(rank, world_size\)", dict(expert_placement="0,2"), ValueError),
    (r"expert_placement must be None or \(rank, world_size\)", dict(expert_placement=(True, 2)), ValueError),
    (r"expert_placement \(0, 4\): world_size 4 has no all_to_all curve", dict(expert_placement=(0, 4)), ValueError),
    ("expert_placement_bytes_per_rank", dict(expert_placement=(0, 2), expert_placement_bytes_per_rank=0), ValueError),
    ("expert_placement_bytes_per_rank", dict(expert_placement=(0, 2), expert_placement_bytes_per_rank=1.5), TypeError),
    ("expert_placement_bytes_per_rank .* needs expert_placement", dict(expert_placement_bytes_per_rank=4096), ValueError),
]


@pytest.mark.parametrize("match, kwargs, error", BAD_PLACEMENT,
                         ids=[f"placement-{i}" for i in range(len(BAD_PLACEMENT))])
def test_bad_placement(cost_model, match, kwargs, error):
    with pytest.raises(error, match=match):
        EnergyAwareTTTRouter(H, E, K, cost_model, **kwargs)


def test_placement_needs_a_measured_exchange(tmp_path):
    table = decode_table()
    del table["collectives"]
    write_json_atomic(tmp_path / "no_comm.json", table)
    with pytest.raises(ValueError, match="expert_placement .* no collectives section"):
        EnergyAwareTTTRouter(H, E, K, KernelCostModel("TESTGPU", table=tmp_path / "no_comm.json"),
                             expert_placement=(0, 2))


# ---- dynamic k, bad input, FusedMoE --------------------------------------------------------------
