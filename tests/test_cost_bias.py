"""The energy-aware selection-bias kernel against its torch reference and the host cost model."""
import math

import numpy as np
import pytest
import torch

from costmodel.kernel_cost_model import KernelCostModel
from kernels.cost_bias import (cost_curves, expert_cost_bias, expert_cost_bias_reference, expert_cost_reference,
                               ttt_offset_step, ttt_offset_step_reference)
from tests.conftest import DEVICE

WEIGHTS = dict(energy_weight=1.0, latency_weight=0.5, max_shift=0.2, thermal_gain=1.0, thermal_margin_c=15.0)
STATES = [(math.nan, math.nan, math.nan), (50.0, 300.0, 0.0), (80.0, 300.0, 0.45), (120.0, 650.0, 0.99)]


def random_ids(T, K, E, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE, torch.int32) \
        if T else torch.empty(0, K, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("gpu", ["H100", "A100"], ids=["measured", "prior"])
@pytest.mark.parametrize("T, K, E", [(1, 2, 8), (13, 2, 5), (37, 8, 128), (0, 2, 4), (300, 1, 3)])
@pytest.mark.parametrize("state", STATES, ids=["unknown", "cool", "hot-pressed", "beyond"])
def test_kernel_matches_reference(gpu, T, K, E, state):
    curves = cost_curves(KernelCostModel(gpu).device_curves("swiglu_ffn"), DEVICE)
    ids = random_ids(T, K, E, seed=T + E)
    hardware = torch.tensor(state, device=DEVICE)
    offsets = (torch.rand(E, generator=torch.Generator().manual_seed(E)) - 0.5).mul(0.1).to(DEVICE)
    ours = expert_cost_bias(ids, curves, hardware, offsets, **WEIGHTS)
    ref = expert_cost_bias_reference(ids, curves, hardware, offsets, **WEIGHTS)
    assert ours.shape == (E,) and torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert (ours <= 0).all() and (ours >= -WEIGHTS["max_shift"]).all()


def test_bias_is_the_host_models_marginal_cost():
    """Idle expert: cost(1); expert with load 3: cost(3) - cost(2); at 65 °C and 30% pressure."""
    model = KernelCostModel("H100")
    curves = cost_curves(model.device_curves("swiglu_ffn"), DEVICE)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]], dtype=torch.int32, device=DEVICE)
    hardware = torch.tensor([65.0, 300.0, 0.3], device=DEVICE)
    weights = dict(energy_weight=1.0, latency_weight=0.0, max_shift=0.2, thermal_gain=0.0)
    bias = expert_cost_bias(ids, curves, hardware, torch.zeros(4, device=DEVICE), **weights).tolist()
    cost = {b: model.get_cost("swiglu_ffn", b, current_temp=65.0, memory_pressure=0.3)["energy_joules"]
            for b in (1, 2, 3)}
    fixed = model.get_cost("swiglu_ffn", 1)["energy_joules"]

    def expected(marginal_j):
        score = max(marginal_j / fixed, 0.0)
        return -0.2 * score / (1 + score)
    assert bias[3] == pytest.approx(expected(cost[1]), rel=1e-4), "idle: the fixed weight load"
    assert bias[0] == pytest.approx(expected(cost[3] - cost[2]), rel=1e-4, abs=1e-7), "busy: per token"
    assert bias[2] == pytest.approx(expected(cost[1]), rel=1e-4), "a singleton costs its token the weight load"


def test_bad_input():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids, state, offsets = random_ids(3, 2, 4, 0), torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)
    with pytest.raises(TypeError, match="topk_ids"):
        expert_cost_bias(ids.float(), curves, state, offsets, **WEIGHTS)
    with pytest.raises(ValueError, match="hardware_state"):
        expert_cost_bias(ids, curves, torch.zeros(2, device=DEVICE), offsets, **WEIGHTS)
    with pytest.raises(TypeError, match="bias_offsets"):
        expert_cost_bias(ids, curves, state, offsets.double(), **WEIGHTS)
    with pytest.raises(TypeError, match="curves"):
        expert_cost_bias(ids, "H100", state, offsets, **WEIGHTS)
    for name, value in (("max_shift", -0.1), ("energy_weight", math.nan), ("thermal_margin_c", 0.0),
                        ("energy_weight", 1e300), ("max_shift", 1e39)):  # the last two overflow float32
        with pytest.raises(ValueError, match=name):
            expert_cost_bias(ids, curves, state, offsets, **(WEIGHTS | {name: value}))
    for name, value in (("energy_weight", "1"), ("max_shift", True)):
        with pytest.raises(TypeError, match=name):
            expert_cost_bias(ids, curves, state, offsets, **(WEIGHTS | {name: value}))
    with pytest.raises(ValueError, match="conv2d"):
        cost_curves(KernelCostModel("H100").device_curves("conv2d"), DEVICE)
    strided = torch.zeros(6, device=DEVICE)[::2]
    with pytest.raises(ValueError, match="hardware_state must be contiguous"):
        expert_cost_bias(ids, curves, strided, offsets, **WEIGHTS)
    with pytest.raises(ValueError, match="bias_offsets must be contiguous"):
        expert_cost_bias(ids, curves, state, torch.zeros(1, device=DEVICE).expand(4), **WEIGHTS)
    window = torch.zeros(2, 4, device=DEVICE)
    for lr, error in ((math.nan, ValueError), (0.0, ValueError), (None, TypeError), ("0.1", TypeError),
                      (True, TypeError), (math.inf, ValueError)):
        with pytest.raises(error, match="lr"):
            ttt_offset_step(window, curves, state, offsets, lr=lr, **WEIGHTS)
    with pytest.raises(ValueError, match="bias_offsets must be contiguous"):  # written in place: never a view's base
        ttt_offset_step(window, curves, state, torch.zeros(8, device=DEVICE)[::2], lr=0.1, **WEIGHTS)


def test_numpy_knobs_are_numbers():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids, state, offsets = random_ids(5, 2, 4, 1), torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)
    numpy_knobs = {k: np.float32(v) for k, v in WEIGHTS.items()}
    assert torch.equal(expert_cost_bias(ids, curves, state, offsets, **numpy_knobs),
                       expert_cost_bias(ids, curves, state, offsets, **WEIGHTS))


def test_nan_offsets_and_extra_costs_propagate_as_in_the_reference():
    """A NaN in the router's state stays NaN in the bias (which the routing then masks), in both."""
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids, state = random_ids(6, 2, 4, 2), torch.full((3,), math.nan, device=DEVICE)
    offsets = torch.tensor([math.nan, 0.0, 0.0, 0.0], device=DEVICE)
    extra = torch.zeros(2, 4, device=DEVICE)
    extra[0, 2] = math.nan
    ours = expert_cost_bias(ids, curves, state, offsets, **WEIGHTS, extra_cost=extra)
    ref = expert_cost_bias_reference(ids, curves, state, offsets, **WEIGHTS, extra_cost=extra)
    assert ours.isnan().tolist() == ref.isnan().tolist() == [True, False, True, False]
    assert torch.allclose(ours[[1, 3]], ref[[1, 3]], rtol=1e-5)
    ours_window, ref_window = (torch.tensor([[3.0, 2.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]], device=DEVICE)
                               for _ in range(2))
    ours_offsets, ref_offsets = offsets.clone(), offsets.clone()
    ttt_offset_step(ours_window, curves, state, ours_offsets, lr=0.01, **WEIGHTS)
    ttt_offset_step_reference(ref_window, curves, state, ref_offsets, lr=0.01, **WEIGHTS)
    assert ours_offsets.isnan().tolist() == ref_offsets.isnan().tolist()


def test_an_overflowing_score_saturates_at_the_maximum_shift():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids, state, offsets = random_ids(2, 2, 8, 3), torch.zeros(3, device=DEVICE), torch.zeros(8, device=DEVICE)
    knobs = WEIGHTS | {"energy_weight": 3e38}  # finite in float32; a weight load's score overflows to +Inf
    ours = expert_cost_bias(ids, curves, state, offsets, **knobs)
    idle = torch.bincount(ids.reshape(-1).long(), minlength=8) <= 1  # idle or singleton: the weight load
    assert torch.isfinite(ours).all() and (ours >= -WEIGHTS["max_shift"]).all()
    assert torch.allclose(ours[idle], torch.full_like(ours[idle], -WEIGHTS["max_shift"])) and idle.any()
    assert torch.allclose(ours, expert_cost_bias_reference(ids, curves, state, offsets, **knobs))


def test_per_token_extra_is_scored_against_a_tokens_compute():
    """Busy experts (a Qwen3-sized batch): a remote transfer worth one token's marginal compute must
    move the bias by about half the maximum shift, s/(1+s) going from ~0 to ~1/2; scored against
    the one-token (weight-load) cost instead it would move it by ~max_shift/300."""
    model = KernelCostModel("H100")
    curves = cost_curves(model.device_curves("swiglu_ffn"), DEVICE)
    T, K, E = 2048, 8, 128
    ids, hardware = random_ids(T, K, E, seed=3), torch.full((3,), math.nan, device=DEVICE)
    loads = torch.bincount(ids.reshape(-1).long(), minlength=E)
    assert (loads > 0).all()
    mean = (loads.sum() / E).reshape(1).float().to(DEVICE)
    marginal = expert_cost_reference(curves, hardware, mean + 1)[0] - expert_cost_reference(curves, hardware, mean)[0]
    extra = torch.zeros(2, E, device=DEVICE)
    extra[0, E // 2:] = marginal
    weights = dict(energy_weight=1.0, latency_weight=0.0, max_shift=0.2)
    offsets = torch.zeros(E, device=DEVICE)
    plain = expert_cost_bias(ids, curves, hardware, offsets, **weights)
    ours = expert_cost_bias(ids, curves, hardware, offsets, **weights, extra_cost=extra)
    assert torch.equal(ours[:E // 2], plain[:E // 2])
    shift = (plain - ours)[E // 2:]
    assert (shift > 0.4 * weights["max_shift"]).all() and (shift < 0.5 * weights["max_shift"]).all(), shift


@pytest.mark.parametrize("E", [5, 128])
@pytest.mark.parametrize("state", STATES[:3], ids=["unknown", "cool", "hot-pressed"])
def test_offset_step_matches_reference_and_attracts_cheap_experts(E, state):
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    gen = torch.Generator().manual_seed(E)
    tokens = torch.randint(0, 40, (E,), generator=gen).float()
    tokens[0] = 0.0  # an expert that never ran keeps its offset
    window = torch.stack((tokens, (tokens > 0).float() * torch.randint(1, 4, (E,), generator=gen))).to(DEVICE)
    offsets = (torch.rand(E, generator=gen) - 0.5).mul(0.2).to(DEVICE)
    hardware = torch.tensor(state, device=DEVICE)
    knobs = dict(lr=0.01, energy_weight=1.0, latency_weight=0.3, max_shift=0.2)
    ours_window, ours_offsets = window.clone(), offsets.clone()
    ttt_offset_step(ours_window, curves, hardware, ours_offsets, **knobs)
    ttt_offset_step_reference(window, curves, hardware, offsets, **knobs)
    assert torch.allclose(ours_offsets, offsets, atol=1e-7) and (ours_window == 0).all() and (window == 0).all()


def test_offset_step_moves_toward_lower_cost_per_token():
    """Per routed token a busy expert (weight load shared) is cheaper: its offset rises, an
    expert that ran with one token at a time falls."""
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    window = torch.tensor([[64.0, 4.0, 0.0], [1.0, 4.0, 0.0]], device=DEVICE)  # 64 tokens in 1 batch; 1 per batch
    offsets = torch.zeros(3, device=DEVICE)
    ttt_offset_step(window, curves, torch.full((3,), math.nan, device=DEVICE), offsets, lr=0.01, energy_weight=1.0,
                    latency_weight=0.0, max_shift=0.2)
    assert offsets.tolist() == pytest.approx([0.01, -0.01, 0.0])


def test_window_is_checked():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    with pytest.raises(ValueError, match="window"):
        ttt_offset_step(torch.zeros(3, 4, device=DEVICE), curves, torch.zeros(3, device=DEVICE),
                        torch.zeros(4, device=DEVICE), lr=0.1, energy_weight=1.0, latency_weight=0.0, max_shift=0.1)


def remote_extra_cost(model, E, seed):
    """[2, E] per-token energy and latency of about one expert's fixed cost on every other (remote)
    expert, 0 on the local ones (synthetic, for the kernel against its reference)."""
    fixed = model.get_cost("swiglu_ffn", 1)
    gen = torch.Generator().manual_seed(seed)
    extra = torch.rand(2, E, generator=gen) * torch.tensor([[fixed["energy_joules"]], [fixed["latency_ms"]]])
    extra[:, ::2] = 0.0
    return extra.to(DEVICE)


@pytest.mark.parametrize("T, K, E", [(13, 2, 5), (0, 2, 7), (37, 8, 128), (1, 1, 3)],
                         ids=["odd-E", "no-tokens", "E128", "single-token"])
@pytest.mark.parametrize("state", STATES, ids=["unknown", "cool", "hot-pressed", "beyond"])
def test_kernel_with_extra_cost_matches_reference(T, K, E, state):
    model = KernelCostModel("H100")
    curves = cost_curves(model.device_curves("swiglu_ffn"), DEVICE)
    ids, hardware = random_ids(T, K, E, seed=T + E), torch.tensor(state, device=DEVICE)
    offsets = (torch.rand(E, generator=torch.Generator().manual_seed(E)) - 0.5).mul(0.1).to(DEVICE)
    extra = remote_extra_cost(model, E, seed=E)
    ours = expert_cost_bias(ids, curves, hardware, offsets, **WEIGHTS, extra_cost=extra)
    ref = expert_cost_bias_reference(ids, curves, hardware, offsets, **WEIGHTS, extra_cost=extra)
    assert ours.shape == (E,) and torch.isfinite(ours).all()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    plain = expert_cost_bias(ids, curves, hardware, offsets, **WEIGHTS)
    remote = extra[0] > 0
    idle = torch.bincount(ids.reshape(-1).long(), minlength=E) == 0  # a positive score, which the extra raises
    assert torch.equal(ours[~remote], plain[~remote]), "local experts: the no-extra path"
    assert (ours[remote] <= plain[remote]).all()
    lower = (ours < plain) | (plain == -WEIGHTS["max_shift"])  # unless already at the floor
    assert lower[remote & idle].all()


@pytest.mark.parametrize("E", [5, 128])
@pytest.mark.parametrize("state", STATES[:3], ids=["unknown", "cool", "hot-pressed"])
def test_offset_step_with_extra_cost_matches_reference(E, state):
    model = KernelCostModel("H100")
    curves = cost_curves(model.device_curves("swiglu_ffn"), DEVICE)
    gen = torch.Generator().manual_seed(E)
    tokens = torch.randint(0, 40, (E,), generator=gen).float()
    window = torch.stack((tokens, (tokens > 0).float() * torch.randint(1, 4, (E,), generator=gen))).to(DEVICE)
    offsets = (torch.rand(E, generator=gen) - 0.5).mul(0.2).to(DEVICE)
    hardware, extra = torch.tensor(state, device=DEVICE), remote_extra_cost(model, E, seed=E + 1)
    knobs = dict(lr=0.01, energy_weight=1.0, latency_weight=0.3, max_shift=0.2, extra_cost=extra)
    ours_window, ours_offsets = window.clone(), offsets.clone()
    ttt_offset_step(ours_window, curves, hardware, ours_offsets, **knobs)
    ttt_offset_step_reference(window, curves, hardware, offsets, **knobs)
    assert torch.allclose(ours_offsets, offsets, atol=1e-7) and (ours_window == 0).all()


def test_offset_step_charges_the_extra_cost_per_token():
    """Two experts that ran alike; the remote one's tokens also pay the exchange: it steps down."""
    model = KernelCostModel("H100")
    curves = cost_curves(model.device_curves("swiglu_ffn"), DEVICE)
    window = torch.tensor([[8.0, 8.0], [2.0, 2.0]], device=DEVICE)
    extra = torch.tensor([[0.0, 1e-4], [0.0, 0.0]], device=DEVICE)
    offsets = torch.zeros(2, device=DEVICE)
    ttt_offset_step(window, curves, torch.full((3,), math.nan, device=DEVICE), offsets, lr=0.01, energy_weight=1.0,
                    latency_weight=0.0, max_shift=0.2, extra_cost=extra)
    assert offsets.tolist() == pytest.approx([0.01, -0.01])


def test_extra_cost_is_checked():
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids, state, offsets = random_ids(3, 2, 4, 0), torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)
    bad = [(ValueError, torch.zeros(4, device=DEVICE)), (ValueError, torch.zeros(2, 5, device=DEVICE)),
           (TypeError, torch.zeros(2, 4, device=DEVICE, dtype=torch.float64)),
           (ValueError, torch.zeros(4, 2, device=DEVICE).T), (TypeError, [[0.0] * 4] * 2)]
    for error, extra in bad:
        with pytest.raises(error, match="extra_cost"):
            expert_cost_bias(ids, curves, state, offsets, **WEIGHTS, extra_cost=extra)
        with pytest.raises(error, match="extra_cost"):
            ttt_offset_step(torch.zeros(2, 4, device=DEVICE), curves, state, offsets, lr=0.1, energy_weight=1.0,
                            latency_weight=0.0, max_shift=0.1, extra_cost=extra)


def test_out_of_range_ids_count_for_no_expert():
    """Kernel and reference alike: an id outside [0, E) loads no expert (the reference used to fail
    on one), and a strided [T, 1] slice of ids reads as its values (the kernel used to read memory
    order)."""
    curves = cost_curves(KernelCostModel("H100").device_curves("swiglu_ffn"), DEVICE)
    ids = torch.tensor([[0, 9], [1, -1], [0, 2]], dtype=torch.int32, device=DEVICE)
    state, offsets = torch.tensor(STATES[1], device=DEVICE), torch.zeros(4, device=DEVICE)
    ours = expert_cost_bias(ids, curves, state, offsets, **WEIGHTS)
    ref = expert_cost_bias_reference(ids, curves, state, offsets, **WEIGHTS)
    valid = expert_cost_bias(ids[:, :1], curves, state, offsets, **WEIGHTS)  # strided; loads of experts 0, 1 alike
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (ours, ref)
    assert torch.equal(ours[:2], valid[:2]), (ours, valid)


def test_cost_curves_takes_the_cost_models_plain_curves_only():
    curves = KernelCostModel("H100").device_curves("swiglu_ffn")
    with pytest.raises(TypeError, match="curves must be a dict"):
        cost_curves(KernelCostModel("H100"), DEVICE)
    with pytest.raises(ValueError, match=r"curves lacks \['clock'\]"):
        cost_curves({k: v for k, v in curves.items() if k != "clock"}, DEVICE)
    with pytest.raises(ValueError, match="at least 2 measured points"):
        cost_curves(curves | {k: curves[k][:1] for k in ("batch_size", "energy_j", "latency_ms")}, DEVICE)


def test_the_device_curves_are_the_host_models_own():
    model = KernelCostModel("H100")
    curves = model.device_curves("swiglu_ffn")
    assert curves["fixed_energy_j"] == model.get_cost("swiglu_ffn", 1)["energy_joules"]
    assert curves["clock"] == model.clock_curve() and curves["pressure"][0] == pytest.approx((0.0, 1.0))
    packed = cost_curves(curves, DEVICE)
    assert packed.n_table == len(curves["batch_size"]) and packed.fixed_latency_ms == curves["fixed_latency_ms"]
