"""EnergyAwareTTTRouter and HardwareMonitor: exactness at zero cost, selection-only bias, the quality
bound, statistics, bad input, FusedMoE, CUDA graphs (test-time training, the hardware state and
placement: tests/test_router_ttt.py, test_router_hardware.py, test_router_placement.py).

The cost tables here are synthetic test data (a fixed weight-load cost plus a small per-token
cost), never a measurement."""
import math
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

import kernels
from calibration.nvml_meter import GpuMeter
from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from kernels.fused_experts import fused_experts_reference
from router import EnergyAwareTTTRouter, HardwareMonitor, OEARouter
from tests.conftest import DEVICE, assert_matches, randn, requires_gpu
from tests.fake_nvml import FakeNvml
from tests.test_cost_model import synthetic_table

H, E, K, I = 32, 8, 2, 16
COST = {"energy": 1.0, "latency": 0.0, "quality": 1.0}


COMM_J_PER_BYTE, COMM_MS_PER_BYTE = 2e-3, 1e-3


def decode_table(d_model=H, drop_swiglu=False):
    """swiglu_ffn: 1 J + 0.02 J/token and 1 ms + 10 us/token (weight load dominates, as in decode;
    1 kW at one token); all_to_all over 2 ranks: 1 J + 2 mJ/byte and 0.5 ms + 1 us/byte (a token's
    exchange costs a visible share of an expert's weight load)."""
    table = synthetic_table()
    table["dims"] = asdict(ModelDims(d_model=d_model, d_ff=I, n_heads=4, num_experts=E, top_k=K))
    table["ops"]["swiglu_ffn"]["points"] = [
        {"batch_size": b, "latency_ms": 1.0 + 0.01 * b, "energy_j": 1.0 + 0.02 * b, "memory_gb": 1e-3 * b}
        for b in (1, 4, 16, 64, 256)]
    table["collectives"] = {"all_to_all": {"2": {"source": "measured", "points": [
        {"bytes_per_rank": b, "latency_ms": 0.5 + COMM_MS_PER_BYTE * b, "energy_j": 1.0 + COMM_J_PER_BYTE * b}
        for b in (2 ** 10, 2 ** 16, 2 ** 22)]}}}
    if drop_swiglu:
        del table["ops"]["swiglu_ffn"]
    return table


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # each test draws the same weights, whatever ran before it


@pytest.fixture
def cost_model(tmp_path):
    write_json_atomic(tmp_path / "TESTGPU.json", decode_table())
    return KernelCostModel("TESTGPU", table=tmp_path / "TESTGPU.json")


def fake_monitor(**fake):
    nvml = FakeNvml(**fake)
    return HardwareMonitor(GpuMeter(nvml=nvml)), nvml


def batches(sizes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [randn(T, H, dtype=dtype, generator=gen) for T in sizes]


def router_pair(cost_model, weights=COST, dtype=torch.float32, renormalize=True, weights_dtype=None, **kwargs):
    """A TopKRouter and an energy-aware router sharing its gate weight."""
    plain = kernels.TopKRouter(randn(E, H, dtype=dtype), K, renormalize, weights_dtype)
    return plain, EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=weights, **kwargs)


def probs_of(router, x):
    return torch.softmax((x @ router.weight.T).float(), dim=-1)


# ---- exactness and the selection-only bias ------------------------------------------------------

@pytest.mark.parametrize("dtype, renormalize, weights_dtype, grad", [
    (torch.float32, True, None, False), (torch.float16, False, "logits", False), (torch.float32, True, None, True),
], ids=["fp32-renorm", "fp16-raw-logits-dtype", "fp32-grad"])
def test_zero_cost_weights_equal_topk_router_bitwise(cost_model, dtype, renormalize, weights_dtype, grad):
    plain, router = router_pair(cost_model, {"energy": 0.0, "latency": 0.0}, dtype, renormalize, weights_dtype,
                                ttt_update_frequency=8)
    plain.weight.requires_grad_(grad)
    for x in batches([5, 16, 1, 9], dtype=dtype):
        with torch.set_grad_enabled(grad):
            for ours, ref in zip(router(x), plain(x), strict=True):
                assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    assert router.stats()["rerouted_tokens"] == 0 and router.ttt_updates == 0, "nothing to adapt at zero cost"


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_bias_changes_selection_not_weights(cost_model, renormalize):
    plain, router = router_pair(cost_model, renormalize=renormalize)
    x = batches([6], seed=3)[0]
    _, weights, ids = router(x)
    chosen = probs_of(router, x).gather(1, ids.long())
    expected = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
    assert torch.allclose(weights, expected, rtol=1e-6, atol=1e-7)
    assert router.stats()["rerouted_tokens"] > 0, "the test must exercise a re-route"
    assert not torch.equal(ids, plain(x)[2])


def test_bias_concentrates_tokens_onto_fewer_experts(cost_model):
    plain, router = router_pair(cost_model)
    for x in batches([6, 5, 7, 6, 4], seed=3):
        _, _, ids = router(x)
        assert torch.unique(ids).numel() <= torch.unique(plain(x)[2]).numel(), "no token moves to an idle expert"
    stats = router.stats()
    assert stats["distinct_experts"] < stats["plain_distinct_experts"]


def test_quality_bounds_every_swap_and_the_rerouted_fraction(cost_model):
    plain = kernels.TopKRouter(randn(E, H), K)
    rerouted = []
    for quality in (1.0, 4.0, 1e6):
        router = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights={"quality": quality})
        for x in batches([6] * 12, seed=5):
            probs, plain_ids, ids = probs_of(plain, x), plain(x)[2], router(x)[2]
            for t in range(x.shape[0]):
                dropped = set(plain_ids[t].tolist()) - set(ids[t].tolist())
                added = set(ids[t].tolist()) - set(plain_ids[t].tolist())
                for a in dropped:
                    for b in added:  # every bias is in [-delta, 0]: no swap crosses a gap of delta
                        assert probs[t, a] - probs[t, b] <= router.max_shift + 1e-6
        rerouted.append(router.stats()["rerouted_fraction"])
    assert rerouted[0] >= rerouted[1] >= rerouted[2] and rerouted[0] > rerouted[2], rerouted


def test_stats_count_on_the_device(cost_model):
    plain, router = router_pair(cost_model, adapt=False)
    distinct = rerouted = changed = 0
    for x in batches([5, 7, 3], seed=2):
        _, _, ids = router(x)
        plain_ids = plain(x)[2]
        distinct += torch.unique(ids).numel()
        moved = ~(ids[:, :, None] == plain_ids[:, None, :]).any(2)
        rerouted += int(moved.any(1).sum())
        changed += int(moved.sum())
    stats = router.stats()
    assert (stats["calls"], stats["tokens"], stats["distinct_experts"]) == (3, 15, distinct)
    assert (stats["rerouted_tokens"], stats["changed_slots"]) == (rerouted, changed)
    assert stats["rerouted_fraction"] == pytest.approx(rerouted / 15)
    assert stats["active_experts_per_token"] == K and stats["nan_tokens"] == 0
    router.reset_stats()
    assert router.stats()["calls"] == 0


# ---- test-time training --------------------------------------------------------------------------

def test_top_p_zeroes_experts_past_the_nucleus(cost_model):
    plain = kernels.TopKRouter(randn(E, H), 4)
    x = batches([20])[0]
    full = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST)(x)[1]
    router = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST, top_p=0.5)
    _, weights, ids = router(x)
    assert weights.shape == ids.shape == (20, 4)
    active = weights > 0
    assert active.any(1).all() and (~active).any(), "at least one expert per token, and some dropped"
    assert torch.allclose(weights.sum(1), torch.ones(20, device=DEVICE))
    for t in range(20):  # kept: the experts whose higher-weight peers hold less than top_p of the share
        order = full[t].argsort(descending=True)
        ahead = full[t][order].cumsum(0) - full[t][order]
        assert torch.equal(active[t][order], ahead < 0.5)
    assert router.stats()["active_experts_per_token"] == pytest.approx(active.sum().item() / 20)


def test_nan_and_inf_hidden_states_contribute_nothing(cost_model):
    _, router = router_pair(cost_model)
    x = batches([6])[0]
    x[1] = float("nan")
    x[4] = float("inf")  # logits inf - inf = NaN
    _, weights, ids = router(x)
    assert torch.equal(weights[[1, 4]], torch.zeros(2, K, device=DEVICE))
    assert torch.isfinite(weights).all() and (weights[[0, 2, 3, 5]].sum(1) > 0.99).all()
    assert (ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all(), "K distinct experts, NaN rows too"
    assert router.stats()["nan_tokens"] == 2


def test_bias_never_selects_a_nan_expert():
    logits = randn(3, E)
    logits[:, 2] = float("nan")
    bias = torch.full((E,), -0.9, device=DEVICE)
    bias[2] = 0.0  # the cheapest expert by far, but its probability is 0
    ids = kernels.route(logits, K, selection_bias=bias).topk_ids
    assert not (ids == 2).any()


BAD_FORWARD = [
    (TypeError, "hidden_states", lambda: [[0.0] * H]),
    (TypeError, "hidden_states", lambda: torch.zeros(3, H, dtype=torch.int32, device=DEVICE)),
    (TypeError, "hidden_states", lambda: randn(3, H, dtype=torch.float16)),
    (ValueError, "hidden_states", lambda: randn(3, H + 1)),
    (ValueError, "hidden_states", lambda: randn(2, 3, H)),
]


@pytest.mark.parametrize("error, match, make", BAD_FORWARD, ids=[f"{e.__name__}-{i}" for i, (e, _, _) in
                                                                 enumerate(BAD_FORWARD)])
def test_bad_forward_input(cost_model, error, match, make):
    _, router = router_pair(cost_model)
    with pytest.raises(error, match=match):
        router(make())


BAD_CONSTRUCTION = [
    ("objective_weights has unknown keys", dict(objective_weights={"energi": 1.0})),
    (r"objective_weights\['energy'\]", dict(objective_weights={"energy": -1.0})),
    (r"objective_weights\['latency'\]", dict(objective_weights={"latency": math.nan})),
    (r"objective_weights\['quality'\]", dict(objective_weights={"quality": True})),
    ("quality'] must be > 0", dict(objective_weights={"energy": 1.0, "quality": 0.0})),
    ("top_k", dict(top_k=E + 1)),
    ("top_k", dict(top_k=0)),
    ("num_experts", dict(num_experts=0)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("energy_aware_lr", dict(energy_aware_lr=0.0)),
    ("max_memory_pressure", dict(max_memory_pressure=1.0)),
    ("ttt_update_frequency", dict(ttt_update_frequency=0)),
    ("muon_enabled .* needs ttt_gate", dict(muon_enabled=True)),
    (r"weight must be \[num_experts, d_model\]", dict(weight=torch.zeros(E, H + 1, device=DEVICE))),
    ("expert_weights must be one of", dict(expert_weights=["bf16"])),
    ("device must be a torch device present here", dict(device="tpu")),
    ("device must be a torch device present here", dict(device="cuda:99")),
]
BAD_CONSTRUCTION_TYPES = [
    ("top_k must be an int", dict(top_k=2.0)),
    ("num_experts must be an int", dict(num_experts="8")),
    ("d_model must be an int", dict(d_model=True)),
    ("monitor must be a router.HardwareMonitor", dict(monitor="gpu0")),
    ("dtype must be one of float32", dict(dtype=torch.int64)),
    ("ttt_gate must be a bool", dict(ttt_gate="no")),  # a truthy string would have switched it on
    ("adapt must be a bool", dict(adapt="False")),
    ("track_stats must be a bool", dict(track_stats=None)),
    ("muon_enabled must be a bool", dict(muon_enabled=1, ttt_gate=True)),
    ("kernel_cost_model must be a costmodel.KernelCostModel", dict(kernel_cost_model="H100")),
    ("kernel_cost_model must be a costmodel.KernelCostModel", dict(kernel_cost_model=None)),
    ("objective_weights must be a dict", dict(objective_weights=["energy", "quality"])),
]


@pytest.mark.parametrize("match, kwargs, error", [(m, k, ValueError) for m, k in BAD_CONSTRUCTION] +
                         [(m, k, TypeError) for m, k in BAD_CONSTRUCTION_TYPES],
                         ids=[f"{m[:24]}-{i}" for i, (m, _) in enumerate(BAD_CONSTRUCTION + BAD_CONSTRUCTION_TYPES)])
def test_bad_construction(cost_model, match, kwargs, error):
    args = dict(d_model=H, num_experts=E, top_k=K, kernel_cost_model=cost_model) | kwargs
    with pytest.raises(error, match=match):
        EnergyAwareTTTRouter(**args)


@pytest.mark.parametrize("router_class", [EnergyAwareTTTRouter, OEARouter], ids=["ours", "oea"])
@pytest.mark.parametrize("router", [None, torch.nn.Linear(H, E)], ids=["none", "nn-linear"])
def test_from_router_needs_a_top_k_router(cost_model, router_class, router):
    with pytest.raises(TypeError, match="router must be a kernels.TopKRouter"):
        router_class.from_router(router, cost_model if router_class is EnergyAwareTTTRouter else 1)


def test_numpy_sizes_are_ints_and_token_counts_cannot_go_negative(cost_model):
    router = EnergyAwareTTTRouter(np.int64(H), np.int32(E), np.int64(K), cost_model)
    assert (router.d_model, router.num_experts, router.top_k) == (H, E, K)
    assert all(type(v) is int for v in (router.d_model, router.top_k, router.ttt_update_frequency))
    for count, error in ((-5, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="count"):
            router.note_tokens(count)


def test_cost_model_checked_at_construction(cost_model, tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "no_ffn.json", decode_table(drop_swiglu=True))
    with pytest.raises(ValueError, match="no 'swiglu_ffn' op"):
        EnergyAwareTTTRouter(H, E, K, KernelCostModel("TESTGPU", table=tmp_path / "no_ffn.json"))
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(RuntimeError, match="torch.optim.Muon"):
        EnergyAwareTTTRouter(H, E, K, cost_model, muon_enabled=True, ttt_gate=True)


def test_a_cost_model_at_other_dims_is_carried_to_the_routers(cost_model):
    """The issue's case: a table at other dims routes anyway. The router costs its own d_model,
    with d_ff scaled alike, says so, and passing the experts' dims exactly is silent."""
    with pytest.warns(UserWarning, match=r"d_model=64, d_ff=\d+ \(scaled alike, modelled\)"):
        router = EnergyAwareTTTRouter(64, E, K, cost_model)
    assert router.kernel_cost_model.dims.d_model == 64
    assert router.kernel_cost_model.dims.d_ff == 2 * cost_model.dims.d_ff  # twice the table's d_model
    exact = cost_model.with_dims(d_model=64, d_ff=96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        router = EnergyAwareTTTRouter(64, E, K, exact).to(DEVICE)
    assert router.kernel_cost_model is exact
    scores = router(torch.randn(5, 64, device=DEVICE))[2]
    assert scores.shape == (5, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_inside_fused_moe(cost_model, dtype):
    plain, router = router_pair(cost_model, {"energy": 0.0}, dtype)
    experts = randn(E, 2 * I, H, dtype=dtype, scale=H ** -0.5), randn(E, H, I, dtype=dtype, scale=I ** -0.5)
    x = randn(2, 7, H, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(kernels.FusedMoE(router, *experts)(x), kernels.FusedMoE(plain, *experts)(x))
        energy_aware = EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights=COST)
        out = kernels.FusedMoE(energy_aware, *experts)(x)
        flat = x.reshape(-1, H)
        _, weights, ids = energy_aware(flat)
        ref = fused_experts_reference(flat.double(), experts[0].double(), experts[1].double(), ids.long(),
                                      weights.double())
    assert_matches(out, ref.reshape(2, 7, H).to(dtype), dtype)


# ---- GPU: no host sync, graph capture ------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("placement", [None, (1, 2)], ids=["single-gpu", "expert-parallel"])
def test_forward_never_syncs_the_host(cost_model, placement):
    monitor, _ = fake_monitor(temperature_c=70)
    _, router = router_pair(cost_model, monitor=monitor, ttt_update_frequency=4, ttt_gate=True,
                            expert_placement=placement)
    xs = batches([4, 4, 4])
    router(xs[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs[1:]:  # the second call runs a TTT update first
            router(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert router.ttt_updates >= 1


def test_the_router_reads_its_monitors_buffer_in_place(cost_model):
    monitor, nvml = fake_monitor(temperature_c=40)
    _, router = router_pair(cost_model, monitor=monitor)
    assert router._state() is monitor.host_state
    nvml.temperature_c = 95
    monitor.poll()
    assert router.energy_weight().item() == pytest.approx(2.0), "the next call sees the new reading"


@requires_gpu
@pytest.mark.parametrize("in_place", [True, False], ids=["pinned-read-in-place", "copy-fallback"])
def test_graph_capture_replays_with_live_hardware_state(cost_model, in_place, monkeypatch):
    if not in_place:  # a Triton that cannot read host pointers: the forward copies the state instead
        monkeypatch.setattr(kernels.pinned_state, "PROBED", {torch.cuda.current_device(): False})
    monitor, nvml = fake_monitor(temperature_c=40)
    _, router = router_pair(cost_model, monitor=monitor)
    assert (router._state() is monitor.host_state) == in_place
    experts = randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5)
    layer = kernels.FusedMoE(router, *experts)
    x = batches([16])[0]
    with torch.no_grad():
        eager = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up on a side stream, as torch.cuda.graph expects
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
            weight_now = router.energy_weight()
        updates = router.ttt_updates
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager) and router.ttt_updates == updates, "no TTT while capturing"
        nvml.temperature_c = 95
        monitor.poll()
        graph.replay()
        torch.cuda.synchronize()
    assert router._state()[0].item() == 95.0 and weight_now.item() == pytest.approx(2.0)
    assert router.stats()["calls"] >= 4, "replays count on the device"


def test_dtype_casts_keep_the_router_state_float32(cost_model):
    _, router = router_pair(cost_model, ttt_update_frequency=4)
    router.half()
    assert router.weight.dtype == torch.float16
    assert {router.bias_offsets.dtype, router.hardware_state.dtype, router._window.dtype} == {torch.float32}
    for x in batches([4, 4], dtype=torch.float16):
        router(x)
    assert router.ttt_updates == 1


def test_fp8_experts_are_costed_by_their_own_op(cost_model, tmp_path):
    """expert_weights="fp8" reads ``expert_ffn_fp8`` (half the fixed cost here) in place of ``swiglu_ffn``."""
    table = decode_table()
    del table["ops"]["expert_ffn_fp8"]
    write_json_atomic(tmp_path / "no_fp8.json", table)
    with pytest.raises(ValueError, match="no 'expert_ffn_fp8' op"):
        EnergyAwareTTTRouter(H, E, K, KernelCostModel("TESTGPU", table=tmp_path / "no_fp8.json"), expert_weights="fp8")
    with pytest.raises(ValueError, match="expert_weights must be one of"):
        EnergyAwareTTTRouter(H, E, K, cost_model, expert_weights="int4")
    table["ops"]["expert_ffn_fp8"] = {"points": [
        {"batch_size": b, "latency_ms": 0.5 + 0.01 * b, "energy_j": 0.5 + 0.02 * b, "memory_gb": 5e-4 * b}
        for b in (1, 4, 16, 64, 256)]}
    write_json_atomic(tmp_path / "fp8.json", table)
    fp8_model = KernelCostModel("TESTGPU", table=tmp_path / "fp8.json")
    fp8, bf16 = (EnergyAwareTTTRouter(H, E, K, fp8_model, expert_weights=w) for w in ("fp8", "bf16"))
    assert (fp8.cost_op, bf16.cost_op) == ("expert_ffn_fp8", "swiglu_ffn")
    fixed_energy = [float(router.kernel_cost_model.get_cost(router.cost_op, 1)["energy_joules"])
                    for router in (fp8, bf16)]
    assert fixed_energy == pytest.approx([0.52, 1.02], rel=1e-6)
