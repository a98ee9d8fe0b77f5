"""EnergyAwareTTTRouter's test-time training (router.ttt): when updates run, what they see, and what they move.

The cost tables are synthetic test data (tests.test_router.decode_table), never a measurement."""

import pytest
import torch
import torch.nn.functional as F

from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from router import EnergyAwareTTTRouter
from tests.conftest import DEVICE, randn
from tests.test_router import COST, E, H, K, batches
from tests.test_router import cost_model as cost_model  # noqa: F401 (the fixture)
from tests.test_router import decode_table, fake_monitor, probs_of, router_pair
from tests.test_router import seeded as seeded  # noqa: F401 (the autouse fixture: seeded RNGs)


def test_ttt_updates_every_frequency_tokens_and_are_costed(cost_model):
    _, router = router_pair(cost_model, ttt_update_frequency=8)
    for x in batches([4] * 5):
        router(x)
    stats = router.stats()
    assert stats["ttt_updates"] == 2, "before the 3rd and the 5th batch (8 and 16 tokens seen)"
    assert stats["ttt_time_s"] > 0
    assert stats["ttt_energy_j_attributed"] is None and "no monitor power" in stats["ttt_energy_note"]

    monitor, _ = fake_monitor(power_w=250.0)
    _, powered = router_pair(cost_model, ttt_update_frequency=4, monitor=monitor)
    for x in batches([4] * 3):
        powered(x)
    stats = powered.stats()
    assert stats["ttt_updates"] == 2 and "attributed" in stats["ttt_energy_note"]
    assert stats["ttt_energy_j_attributed"] == pytest.approx(250.0 * stats["ttt_time_s"])


@pytest.mark.parametrize("ttt_gate", [False, True], ids=["offsets", "offsets+gate"])
def test_ttt_update_uses_past_batches_only(cost_model, ttt_gate):
    """An update made before batch t cannot depend on batch t: swapping batch t leaves it unchanged."""
    weight = randn(E, H)
    first, last, other_last = batches([6, 6]), batches([6], seed=1)[0], batches([6], seed=2)[0]
    states = []
    for final in (last, other_last):
        router = EnergyAwareTTTRouter(H, E, K, cost_model, COST, ttt_update_frequency=12, energy_aware_lr=0.01,
                                      weight=weight.clone(), ttt_gate=ttt_gate)
        for x in first + [final]:
            router(x)
        assert router.ttt_updates == 1
        states.append((router.bias_offsets.clone(), router.weight.detach().clone()))
    (offsets_a, weight_a), (offsets_b, weight_b) = states
    assert torch.equal(offsets_a, offsets_b) and offsets_a.abs().sum() > 0
    assert torch.equal(weight_a, weight_b)
    assert ttt_gate != torch.equal(weight_a, weight), "only ttt_gate moves the gate weight"


def test_ttt_offsets_attract_tokens_to_cheaper_per_token_experts(cost_model):
    """Expert 0 runs 3 tokens a batch, expert 1 one: per token, 0 is cheaper, so it steps up, 1 down."""
    router = EnergyAwareTTTRouter(4, 4, 1, _model_for(cost_model, 4), {"quality": 1000.0}, ttt_update_frequency=4,
                                  weight=5.0 * torch.eye(4, device=DEVICE))
    x = torch.eye(4, device=DEVICE)[[0, 0, 0, 1]]
    router(x)
    router(x)  # the update runs first, from the previous batch
    lr = router.energy_aware_lr
    assert router.bias_offsets.tolist() == pytest.approx([lr, -lr, 0.0, 0.0])


def _model_for(cost_model, d_model):
    table = decode_table(d_model)
    path = cost_model.path.with_name(f"d{d_model}.json")
    write_json_atomic(path, table)
    return KernelCostModel("TESTGPU", table=path)


@pytest.mark.parametrize("muon", [False, True], ids=["adam", "muon"])
def test_gate_ttt_raises_mass_on_the_chosen_experts_and_ignores_nan_tokens(cost_model, muon):
    _, router = router_pair(cost_model, ttt_update_frequency=16, ttt_gate=True, muon_enabled=muon,
                            energy_aware_lr=0.05, ttt_chunk_size=24)
    xs = batches([8, 8, 8])
    xs[1][3] = float("nan")
    with torch.inference_mode():  # test-time training runs in inference too
        for x in xs[:2]:
            router(x)
        hidden, ids = router._ring_hidden[:16].clone(), router._ring_ids[:16].long()
        finite = torch.isfinite(hidden).all(1)
        before = probs_of(router, hidden).gather(1, ids).sum(1)[finite].mean()
        router(xs[2])
        after = probs_of(router, hidden).gather(1, ids).sum(1)[finite].mean()
    assert router.ttt_updates == 1 and torch.isfinite(router.weight).all()
    assert after > before


def test_gate_gradient_is_autograds(cost_model):
    """The closed-form gate gradient equals autograd's on the ring (a NaN token included)."""
    _, router = router_pair(cost_model, ttt_update_frequency=1000, ttt_gate=True, ttt_chunk_size=24)
    xs = batches([8, 8])
    xs[0][5] = float("nan")
    with torch.inference_mode():
        for x in xs:
            router(x)
    hidden, ids = router._ring_hidden[:16].clone(), router._ring_ids[:16].long()
    finite = torch.isfinite(hidden).all(1)
    weight = router.weight.detach().clone().requires_grad_()
    log_probs = F.linear(torch.where(finite[:, None], hidden, 0.0), weight).float().log_softmax(-1)
    loss = -(log_probs.gather(1, ids).logsumexp(1) * finite).sum() / finite.sum()
    expected, = torch.autograd.grad(loss, weight)
    assert torch.allclose(router._gate_gradient(), expected, rtol=1e-5, atol=1e-7)


def test_ttt_frozen_and_graph_step(cost_model):
    _, router = router_pair(cost_model, ttt_update_frequency=4, adapt=False, energy_aware_lr=0.01)
    for x in batches([4] * 3):
        router(x)
    assert router.ttt_updates == 0 and router._window.abs().sum() == 0
    router.adapt = True
    router(batches([12])[0])
    router.ttt_step()  # what a caller does between CUDA-graph replays
    assert router.ttt_updates == 1 and router.bias_offsets.abs().sum() > 0


@pytest.mark.parametrize("value", ["False", 0, None], ids=["str", "int", "none"])
def test_adapt_set_later_must_be_a_bool(cost_model, value):
    """``router.adapt = "False"`` would have switched test-time training on: refused, the setting kept."""
    _, router = router_pair(cost_model, adapt=False)
    with pytest.raises(TypeError, match="adapt must be a bool"):
        router.adapt = value
    assert router.adapt is False


# ---- hardware state ------------------------------------------------------------------------------
