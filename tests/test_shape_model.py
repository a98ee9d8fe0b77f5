"""The shape-general cost model: the tile launches, the fit, costs at dims no table measured.

The tables here are synthetic test data, generated in this file from the model's own formula
with known constants (or from a known step), never a committed or reported measurement."""
import math
from dataclasses import asdict

import pytest
import torch

from calibration.results import write_json_atomic
from calibration.sweep import SHAPE_SWEEP
from costmodel.fit import Ceilings, OpFit, launch_times, work_totals
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims, expected_experts
from costmodel.shapes import expected_row_blocks, gemm, op_launches, pick_config

CEILINGS = Ceilings(peak_flops=8.0e14, hbm_bytes_per_s=3.0e12, sm_count=132, l2_bytes=50 * 2 ** 20)
CONFIGS = {"matmul": {"entries": [{"when": {"max_m": 64}, "config": {"block_m": 16, "block_n": 64, "block_k": 64}},
                                  {"config": {"block_m": 128, "block_n": 128, "block_k": 64}}]}}
# the constants the synthetic measurements are generated with: what the fit must recover
TRUE_FIT = OpFit(fixed_ms=0.003, compute_eff=0.7, tile_ms=0.0005, l2_eff=1.5, hbm_eff=0.85, stream_eff=6.0,
                 hbm_eff_source="fitted", power_w=250.0, j_per_flop=0.4e-12,
                 j_per_byte=60e-12, j_per_tile_byte=4e-12, hbm_stream_w=150.0, latency_rms=0.0, energy_rms=0.0)
TOKEN_BATCHES = (1, 16, 256, 4096)


def true_cost(op, batch_size, dims):
    launches = op_launches(op, batch_size, dims, CONFIGS)
    times = [launch_times(l, CEILINGS) for l in launches]
    latency_ms = TRUE_FIT.latency_ms(times)
    return latency_ms, TRUE_FIT.energy_j(latency_ms, times, work_totals(launches))


def model_table(shapes, ops=("ffn_gate", "swiglu_ffn", "fused_experts")):
    """A table whose points follow TRUE_FIT exactly at ``shapes`` (the first is the table's dims)."""
    table_dims = shapes[0]
    points = {}
    for op in ops:
        points[op] = []
        for dims in shapes:
            for b in TOKEN_BATCHES:
                latency_ms, energy_j = true_cost(op, b, dims)
                point = {"batch_size": b, "latency_ms": latency_ms, "energy_j": energy_j, "memory_gb": 0.0}
                points[op].append(point | ({} if dims == table_dims else {"dims": asdict(dims)}))
    return {"schema": 1, "gpu": "TESTGPU", "source": "measured", "dims": asdict(table_dims), "idle_power_w": 70.0,
            "peak_flops": CEILINGS.peak_flops, "hbm_bytes_per_s": CEILINGS.hbm_bytes_per_s,
            "sm_count": CEILINGS.sm_count, "l2_cache_bytes": CEILINGS.l2_bytes, "kernel_configs": CONFIGS,
            "ops": {op: {"points": pts} for op, pts in points.items()}}


@pytest.fixture
def swept_model(tmp_path):
    write_json_atomic(tmp_path / "t.json", model_table((ModelDims(),) + SHAPE_SWEEP))
    return KernelCostModel(table=tmp_path / "t.json")


HELD_OUT = [ModelDims(d_model=1536, d_ff=6144, n_heads=12, num_experts=16, top_k=4),
            ModelDims(d_model=2048, d_ff=1024, n_heads=16, num_experts=64, top_k=8),
            ModelDims(d_model=512, d_ff=2048, n_heads=8, num_experts=8, top_k=2)]


@pytest.mark.parametrize("dims", HELD_OUT, ids=lambda d: f"H{d.d_model}_I{d.d_ff}_E{d.num_experts}")
@pytest.mark.parametrize("op", ["ffn_gate", "swiglu_ffn", "fused_experts"])
def test_costs_carry_to_shapes_the_table_never_measured(swept_model, op, dims):
    for b in (3, 48, 700, 3000):
        cost = swept_model.get_cost(op, b, dims=dims)
        latency_ms, energy_j = true_cost(op, b, dims)
        assert cost["source"] == "modelled" and cost["dims"] == asdict(dims)
        assert cost["latency_ms"] == pytest.approx(latency_ms, rel=0.03), (op, b)
        assert cost["energy_joules"] == pytest.approx(energy_j, rel=0.03), (op, b)


def test_the_fit_recovers_the_generating_constants(swept_model):
    fit = swept_model.shapes.fit("swiglu_ffn")
    assert fit.hbm_eff_source == "fitted"  # the Mixtral-sized shape streams from HBM
    assert fit.compute_eff == pytest.approx(TRUE_FIT.compute_eff, rel=0.1)
    assert fit.hbm_eff == pytest.approx(TRUE_FIT.hbm_eff, rel=0.1)
    assert fit.hbm_stream_w == pytest.approx(TRUE_FIT.hbm_stream_w, rel=0.1)
    assert fit.latency_rms < 0.02 and fit.energy_rms < 0.02


def test_a_working_set_beyond_l2_streams_all_its_bytes_from_hbm():
    """A repeated call whose working set fits L2 streams nothing from HBM; one beyond what L2 keeps
    streams every byte (each is evicted before its next use), and only those pay the HBM energy."""
    from costmodel.fit import hbm_seconds
    inside, beyond = (launch_times(gemm(CONFIGS, "matmul", 1, n, 4096), CEILINGS) for n in (1024, 16384))
    assert hbm_seconds([inside]) == 0.0
    beyond_bytes = 2 * (4096 + 16384 * 4096 + 16384)  # x, the weight, y
    assert hbm_seconds([beyond]) == pytest.approx(beyond_bytes / CEILINGS.hbm_bytes_per_s)
    latency_ms = 0.1
    assert (TRUE_FIT.energy_j(latency_ms, [beyond], (0.0, 0.0, 0.0))
            - TRUE_FIT.energy_j(latency_ms, [inside], (0.0, 0.0, 0.0))) == pytest.approx(
        TRUE_FIT.hbm_stream_w * beyond_bytes / CEILINGS.hbm_bytes_per_s)


def test_the_l2_share_follows_the_whole_calls_working_set():
    """Two launches that each fit L2 but together do not stream both (``swiglu_ffn``'s two GEMMs);
    between the two edges the resident share falls linearly; no L2, nothing is resident."""
    from costmodel.fit import L2_HIT_BELOW, L2_MISS_ABOVE, hbm_seconds, l2_resident_share
    l2_s = CEILINGS.l2_bytes / CEILINGS.hbm_bytes_per_s
    half = 0.5 * L2_MISS_ABOVE * l2_s * 1.01
    launch = (0.0, 1, half, l2_s, 0.0)
    assert l2_resident_share(half, l2_s) == 1.0
    assert hbm_seconds([launch, launch]) == pytest.approx(2 * half)
    middle = 0.5 * (L2_HIT_BELOW + L2_MISS_ABOVE) * l2_s
    assert l2_resident_share(middle, l2_s) == pytest.approx(0.5)
    assert l2_resident_share(L2_HIT_BELOW * l2_s, l2_s) == pytest.approx(1.0)
    assert l2_resident_share(L2_MISS_ABOVE * l2_s, l2_s) == pytest.approx(0.0)
    assert l2_resident_share(1e-6, 0.0) == 0.0


def test_ops_on_one_kernel_share_one_energy_fit(tmp_path):
    """An op of an ``ENERGY_POOLS`` pool takes its energy constants from every op of the pool: ffn_gate,
    metered at one point only (none of its weights streaming from HBM), prices HBM bytes from ffn_up's
    metered points; an op alone keeps its own."""
    from costmodel.curves import energy_pool
    table = model_table((ModelDims(),) + SHAPE_SWEEP, ops=("ffn_gate", "ffn_up"))
    for p in table["ops"]["ffn_gate"]["points"][1:]:
        p["energy_j"] = None
    write_json_atomic(tmp_path / "t.json", table)
    fit = KernelCostModel(table=tmp_path / "t.json").shapes.fit("ffn_gate")
    assert fit.power_w == pytest.approx(TRUE_FIT.power_w, rel=0.02)
    assert fit.hbm_stream_w == pytest.approx(TRUE_FIT.hbm_stream_w, rel=0.05)
    assert "ffn_up" in energy_pool("ffn_gate") and energy_pool("rms_norm") == ("rms_norm",)


def test_a_measured_shape_passes_through_its_points(swept_model):
    dims = SHAPE_SWEEP[1]
    for b in TOKEN_BATCHES:
        cost = swept_model.get_cost("fused_experts", b, dims=dims)
        assert cost["source"] == "measured"
        assert cost["latency_ms"] == pytest.approx(true_cost("fused_experts", b, dims)[0], rel=1e-9)
    assert swept_model.get_cost("fused_experts", 100, dims=dims)["source"] == "interpolated"
    assert swept_model.is_measured_shape("fused_experts", dims) and not swept_model.is_measured_shape(
        "fused_experts", HELD_OUT[0])


def test_a_modelled_shape_takes_the_nearest_measured_shapes_correction(tmp_path):
    """One measured shape runs 30% over the tile model (a config's efficiency the fit cannot give it
    alone): a shape next to it inherits most of that, a shape next to the exact ones almost none.
    (Batch sizes away from the 64-row config switch, across which the ratio is interpolated.)"""
    table = model_table((ModelDims(),) + SHAPE_SWEEP, ops=("ffn_gate",))
    slow = SHAPE_SWEEP[2]  # 4096 x 14336
    for p in table["ops"]["ffn_gate"]["points"]:
        if p.get("dims") == asdict(slow):
            p["latency_ms"] *= 1.3
            p["energy_j"] *= 1.3
    write_json_atomic(tmp_path / "t.json", table)
    model = KernelCostModel(table=tmp_path / "t.json")
    near_slow = ModelDims(d_model=4096, d_ff=12288, n_heads=32)
    near_exact = ModelDims(d_model=2048, d_ff=6144, n_heads=16)  # next to SHAPE_SWEEP[0], 2048 x 5632
    bare = model.shapes.model_cost
    for b in (3, 16, 700, 3000):
        cost = model.get_cost("ffn_gate", b, dims=near_slow)
        latency_ms, energy_j = true_cost("ffn_gate", b, near_slow)
        assert cost["source"] == "modelled"
        assert cost["latency_ms"] == pytest.approx(1.3 * latency_ms, rel=0.05), b
        assert cost["energy_joules"] == pytest.approx(1.3 * energy_j, rel=0.05), b
        if b >= 700:  # where the one fit over every shape misses the slow shape's tiles by itself
            assert bare("ffn_gate", b, near_slow)[0] < 0.9 * 1.3 * latency_ms, b
        exact = model.get_cost("ffn_gate", b, dims=near_exact)
        assert exact["latency_ms"] == pytest.approx(true_cost("ffn_gate", b, near_exact)[0], rel=0.05), b


@pytest.mark.parametrize("op, dims", [("ffn_gate", ModelDims()), ("ffn_gate", ModelDims(d_model=3072, d_ff=8192)),
                                      ("rms_norm", ModelDims())], ids=["measured_shape", "modelled_shape", "torch_op"])
def test_a_slow_single_token_stays_at_one_token(tmp_path, op, dims):
    """Every shape's one-token point runs 30% over the model (Triton compiles a row count of 1 as a
    constant: another program): our kernels' ops keep that to one token, 2 and 3 tokens follow the
    other points; a torch op's one-token point interpolates as any other."""
    table = model_table((ModelDims(),) + SHAPE_SWEEP, ops=(op,))
    for p in table["ops"][op]["points"]:
        if p["batch_size"] == 1:
            p["latency_ms"] *= 1.3
            p["energy_j"] *= 1.3
    write_json_atomic(tmp_path / "t.json", table)
    model = KernelCostModel(table=tmp_path / "t.json")
    assert model.get_cost(op, 1, dims=dims)["latency_ms"] == pytest.approx(1.3 * true_cost(op, 1, dims)[0], rel=0.02)
    for b in (2, 3):
        cost = model.get_cost(op, b, dims=dims)
        ratios = [cost["latency_ms"] / true_cost(op, b, dims)[0], cost["energy_joules"] / true_cost(op, b, dims)[1]]
        if op == "rms_norm":
            assert all(r > 1.1 for r in ratios), b
        else:
            assert ratios == pytest.approx([1.0, 1.0], rel=0.02), b


def test_a_latency_only_shape_keeps_its_latencies_and_borrows_energy_from_metered_ones(tmp_path):
    """A shape timed without energy windows (``energy_j`` null, as the sweep's latency shapes): its
    latency curve passes through its points, and its energy is the model's at that latency times the
    correction a modelled shape there borrows from the metered shapes (the two nearest it run 30% over
    the model's energy), not the bare model's."""
    latency_only = ModelDims(d_model=3072, d_ff=8192, n_heads=24)
    metered = model_table((ModelDims(),) + SHAPE_SWEEP, ops=("ffn_gate",))
    off = {tuple(asdict(SHAPE_SWEEP[0]).values()): 1.3, tuple(asdict(SHAPE_SWEEP[2]).values()): 1.3}
    for p in metered["ops"]["ffn_gate"]["points"]:  # the two metered shapes nearest it: energy the fit misses
        p["energy_j"] *= off.get(tuple(p.get("dims", {}).values()), 1.0)
    timed = model_table((latency_only,), ops=("ffn_gate",))["ops"]["ffn_gate"]["points"]
    with_latency_only = metered | {"ops": {"ffn_gate": {"points": metered["ops"]["ffn_gate"]["points"] + [
        p | {"latency_ms": 1.1 * p["latency_ms"], "energy_j": None, "dims": asdict(latency_only)} for p in timed]}}}
    write_json_atomic(tmp_path / "metered.json", metered)
    write_json_atomic(tmp_path / "timed.json", with_latency_only)
    without, model = (KernelCostModel(table=tmp_path / name) for name in ("metered.json", "timed.json"))
    corrections = []
    for b in TOKEN_BATCHES:
        modelled = without.get_cost("ffn_gate", b, dims=latency_only)
        correction = modelled["energy_joules"] / without.shapes.model_cost(
            "ffn_gate", b, latency_only, latency_ms=modelled["latency_ms"])[1]
        corrections.append(correction)
        cost = model.get_cost("ffn_gate", b, dims=latency_only)
        latency_ms = 1.1 * true_cost("ffn_gate", b, latency_only)[0]
        assert cost["latency_ms"] == pytest.approx(latency_ms, rel=1e-9), b
        _, model_j = model.shapes.model_cost("ffn_gate", b, latency_only, latency_ms=latency_ms)
        assert cost["energy_joules"] == pytest.approx(correction * model_j, rel=0.01), b
    assert max(abs(c - 1) for c in corrections) > 0.05  # the borrowed correction is not nothing


def test_a_tile_size_step_is_predicted_not_smoothed_over(tmp_path):
    """Points at 64 and 256 tokens only: between them the config switches from 16-row to 128-row
    tiles at 65, and the wave count jumps; straight interpolation would miss the step at 96."""
    dims = ModelDims(d_model=4096, d_ff=14336, n_heads=32)
    table = model_table((dims,), ops=("ffn_gate",))
    table["ops"]["ffn_gate"]["points"] = [
        {"batch_size": b, "latency_ms": true_cost("ffn_gate", b, dims)[0],
         "energy_j": true_cost("ffn_gate", b, dims)[1], "memory_gb": 0.0} for b in (1, 16, 64, 256, 1024, 4096)]
    write_json_atomic(tmp_path / "t.json", table)
    model = KernelCostModel(table=tmp_path / "t.json")
    for b in (65, 96, 130, 200):
        assert model.get_cost("ffn_gate", b)["latency_ms"] == pytest.approx(true_cost("ffn_gate", b, dims)[0],
                                                                         rel=0.02), b


def test_with_dims_keeps_the_table_and_changes_the_default_shape(swept_model):
    wide = swept_model.with_dims(d_model=1536, d_ff=6144, n_heads=12)
    assert wide.dims.d_model == 1536 and wide.table is swept_model.table and swept_model.dims == ModelDims()
    assert wide.get_cost("ffn_gate", 64) == swept_model.get_cost("ffn_gate", 64, dims=wide.dims)
    assert KernelCostModel(table=wide.path, dims=wide.dims).get_cost("ffn_gate", 64) == wide.get_cost("ffn_gate", 64)
    assert wide.device_curves("ffn_gate")["latency_ms"] != swept_model.device_curves("ffn_gate")["latency_ms"]


def test_the_packaged_table_costs_a_real_models_shape():
    """The issue's case: the H100 table costs real models' experts. Its sweep metered Mixtral's
    expert shape, timed DeepSeek-V3's (7168 x 2048, 256 experts, top 8) without energy windows, and
    never ran Qwen3-235B-A22B's (4096 x 1536, 128 experts, top 8)."""
    model = KernelCostModel("H100")
    mixtral = ModelDims(d_model=4096, d_ff=14336, n_heads=32, num_experts=8, top_k=2, vocab_size=32000)
    deepseek = ModelDims(d_model=7168, d_ff=2048, n_heads=128, num_experts=256, top_k=8, vocab_size=32000)
    qwen3 = ModelDims(d_model=4096, d_ff=1536, n_heads=64, num_experts=128, top_k=8, vocab_size=32000)
    for dims, sources, experts_read in ((mixtral, ("measured", "measured"), 2),
                                        (deepseek, ("measured", "modelled"), 8), (qwen3, ("modelled", "modelled"), 8)):
        cost = model.get_cost("fused_experts", 1, dims=dims)
        assert (cost["source"], cost["energy_source"]) == sources
        # decode reads top_k experts' weights: those a repeated call cannot find in L2 stream from HBM,
        # never faster than the copy ceiling allows (the 2026-12-07 table's Mixtral point is 0.7% under the
        # ceiling for all 705 MB: a read-only stream, part of it from L2)
        hbm_bytes = experts_read * 3 * dims.d_model * dims.d_ff * 2 - model.table["l2_cache_bytes"]
        assert cost["latency_ms"] * 1e-3 >= hbm_bytes / model.table["hbm_bytes_per_s"]
    # at the table's dims 4 tokens were timed without a window: measured latency, interpolated energy
    at_four = model.get_cost("ffn_gate", 4)
    assert (at_four["source"], at_four["energy_source"]) == ("measured", "interpolated")
    # rms_norm reads only d_model: a shape that shares the swept one's is measured, whatever its d_ff
    assert model.get_cost("rms_norm", 1, dims=ModelDims(d_model=4096, d_ff=1024, n_heads=32))["source"] == "measured"


@pytest.mark.parametrize("dims, error, match", [
    ("H100", TypeError, "dims must be a ModelDims"),
    ({"d_model": 256, "width": 3}, ValueError, r"dims has unknown fields \['width'\]"),
    ({"d_model": 0}, ValueError, "dims: d_model must be a positive int"),
    ({"d_model": 250, "n_heads": 4}, ValueError, "dims: d_model .* multiple of n_heads"),
])
def test_bad_dims_are_refused_naming_them(swept_model, dims, error, match):
    with pytest.raises(error, match=match):
        swept_model.get_cost("ffn_gate", 4, dims=dims)
    with pytest.raises(error, match=match):
        swept_model.with_dims(dims)


def test_pick_config_reads_entries_like_the_kernels():
    assert pick_config(CONFIGS, "matmul", m=64, n=1, k=1)["block_m"] == 16
    assert pick_config(CONFIGS, "matmul", m=65, n=1, k=1)["block_m"] == 128
    assert pick_config(None, "matmul", m=1)["block_m"] == 128  # no configs: the generic tile
    launch = gemm(CONFIGS, "matmul", 96, 300, 100)
    assert launch.tiles == 1 * 3 and launch.tile_flops == 2.0 * 128 * 128 * 128  # padded rows, columns and K


def test_fused_experts_counts_padded_row_blocks_of_the_touched_experts():
    dims = ModelDims(d_model=64, d_ff=128, n_heads=1, num_experts=8, top_k=2)
    configs = {"moe_gate_up": {"entries": [{"config": {"block_m": 16, "block_n": 64, "block_k": 32}}]},
               "moe_down": {"entries": [{"config": {"block_n": 32, "block_k": 32}}]}}
    gate_up, down = op_launches("fused_experts", 1, dims, configs)  # 2 slots: two experts, one row block each
    assert gate_up.tiles == 2 * math.ceil(128 / 64) and down.tiles == 2 * math.ceil(64 / 32)
    gate_up, _ = op_launches("fused_experts", 100, dims, configs)  # 200 slots on 8 experts: 25 rows each on average
    assert gate_up.tiles == pytest.approx(expected_row_blocks(100, 8, 2, 16) * 2)
    assert 8 * 2 < expected_row_blocks(100, 8, 2, 16) < 8 * 2.1  # two blocks, a third for the few experts past 32


@pytest.mark.parametrize("B, E, K, block_m", [(1, 8, 2, 16), (5, 64, 8, 16), (100, 8, 2, 16), (768, 16, 2, 64),
                                              (1024, 64, 8, 64), (300, 4, 4, 128)])
def test_expected_row_blocks_match_simulated_uniform_routing(B, E, K, block_m):
    """Each token's top-k as a random K of E; the mean over 400 routings of the row blocks the
    padded runs fill, against the binomial expectation the model uses."""
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(400):
        ids = torch.rand(B, E, generator=gen).argsort(dim=1)[:, :K]
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        blocks.append(float(((counts + block_m - 1) // block_m).sum()))
    assert expected_row_blocks(B, E, K, block_m) == pytest.approx(sum(blocks) / len(blocks), rel=0.01)


def test_expected_row_blocks_edges():
    assert expected_row_blocks(0, 8, 2, 16) == 0.0
    assert expected_row_blocks(1, 8, 2, 16) == pytest.approx(2.0)  # one token: K experts, one block each
    assert expected_row_blocks(40, 4, 4, 16) == 4 * 3  # every expert gets every token
    assert expected_row_blocks(3, 64, 8, 16) == pytest.approx(expected_experts(3, 64, 8))  # runs shorter than a block


def test_latency_only_points_load_but_an_op_needs_one_metered_point(tmp_path):
    table = model_table((ModelDims(),), ops=("ffn_gate",))
    table["ops"]["ffn_gate"]["points"][1]["energy_j"] = None
    write_json_atomic(tmp_path / "t.json", table)
    assert KernelCostModel(table=tmp_path / "t.json").get_cost("ffn_gate", 16)["energy_joules"] > 0
    for point in table["ops"]["ffn_gate"]["points"]:
        point["energy_j"] = None
    write_json_atomic(tmp_path / "t.json", table)
    with pytest.raises(ValueError, match="no point with a measured energy_j"):
        KernelCostModel(table=tmp_path / "t.json")


@pytest.mark.parametrize("key, value, match", [
    ("sm_count", 0, "'sm_count' must be a positive int"),
    ("l2_cache_bytes", 1.5, "'l2_cache_bytes' must be a positive int"),
    ("kernel_configs", {"matmul": {"entries": [{"config": {"block_m": -16}}]}}, r"\['block_m'\] must be a positive"),
])
def test_bad_device_facts_are_refused_naming_the_field(tmp_path, key, value, match):
    write_json_atomic(tmp_path / "t.json", model_table((ModelDims(),), ops=("ffn_gate",)) | {key: value})
    with pytest.raises(ValueError, match=match):
        KernelCostModel(table=tmp_path / "t.json")


def test_repeated_points_are_refused_per_shape(tmp_path):
    table = model_table((ModelDims(), SHAPE_SWEEP[0]), ops=("ffn_gate",))
    points = table["ops"]["ffn_gate"]["points"]
    points.append(dict(points[-1]))  # the same (dims, batch) twice
    write_json_atomic(tmp_path / "t.json", table)
    with pytest.raises(ValueError, match="repeated batch_size"):
        KernelCostModel(table=tmp_path / "t.json")


def test_thinned_curves_keep_measured_points_and_stay_within_tolerance(swept_model):
    """Thinning drops knots the chord of their neighbours predicts within THIN_TOLERANCE; the
    measured batch sizes stay knots (on this synthetic table the measured/model ratio is 1)."""
    from costmodel.curves import THIN_TOLERANCE, TOKEN_KNOTS
    dims = SHAPE_SWEEP[0]
    curve = swept_model.shapes.curve("ffn_gate", dims)
    assert set(TOKEN_BATCHES) <= set(curve.batch_size) and len(curve.batch_size) < len(TOKEN_KNOTS)
    dropped = [b for b in TOKEN_KNOTS if b not in curve.batch_size]
    assert dropped
    for b in dropped:
        latency_ms, energy_j, _ = curve.at(b)
        exact_ms, exact_j = swept_model.shapes.model_cost("ffn_gate", b, dims)
        exact_j = swept_model.shapes.model_cost("ffn_gate", b, dims, latency_ms=exact_ms)[1]
        assert latency_ms == pytest.approx(exact_ms, rel=THIN_TOLERANCE * 1.001), b
        assert energy_j == pytest.approx(exact_j, rel=THIN_TOLERANCE * 1.001), b


def test_a_decode_gemm_is_bound_by_each_tiles_own_stream():
    """12 tiles of a 2048-long K loop fill 12 of 132 SMs: the launch takes at least one SM's share
    of the copy ceiling for each tile's bytes, far more than all its bytes at the whole ceiling."""
    launch = gemm(CONFIGS, "matmul", 3, 768, 2048)
    assert launch.tiles == 1 * 12
    assert launch.tile_bytes == 2 * ((16 + 64) * 2048 + 16 * 64)  # its A rows, B columns, all of K; its output
    compute_s, waves, bytes_s, l2_bytes_s, stream_s = launch_times(launch, CEILINGS)
    assert waves == 1 and stream_s == pytest.approx(launch.tile_bytes * 132 / CEILINGS.hbm_bytes_per_s)
    assert stream_s > 5 * bytes_s
    assert l2_bytes_s == pytest.approx(CEILINGS.l2_bytes / CEILINGS.hbm_bytes_per_s)
    no_sms = launch_times(launch, Ceilings(CEILINGS.peak_flops, CEILINGS.hbm_bytes_per_s))
    assert no_sms[4] == 0.0 and no_sms[3] == 0.0  # no SM count: no per-SM bound; no L2: all streams


def test_routed_tiles_fill_fractional_waves_and_whole_tiles_whole_ones():
    """The fused experts' tile count is an expectation over the routing, so their waves are too: no
    step where the expectation crosses a multiple of the SM count (the measured time has none there)."""
    from costmodel.shapes import Launch
    for tiles, whole, routed in ((100.0, 1, 1.0), (133.0, 2, 133 / 132), (264.5, 3, 264.5 / 132), (0.0, 0, 0.0)):
        for is_routed, expected in ((False, whole), (True, routed)):
            _, waves, _, _, _ = launch_times(Launch(tiles, 1e6, 1e6, routed=is_routed), CEILINGS)
            assert waves == pytest.approx(expected), (tiles, is_routed)
    dims = ModelDims(d_model=256, d_ff=1024, n_heads=4, num_experts=4, top_k=2)
    assert all(l.routed for l in op_launches("fused_experts", 192, dims, CONFIGS))
    assert not any(l.routed for l in op_launches("swiglu_ffn", 192, dims, CONFIGS))


def test_op_shapes_are_the_dims_each_op_reads():
    from costmodel.ops import op_shape
    narrow, wide = ModelDims(d_model=512, d_ff=1024, n_heads=8), ModelDims(d_model=512, d_ff=4096, n_heads=8)
    assert op_shape("rms_norm", narrow) == op_shape("rms_norm", wide) == (512,)
    assert op_shape("ffn_gate", narrow) != op_shape("ffn_gate", wide)
    assert op_shape("flash_attention", narrow) == (512, 8, 512)
    with pytest.raises(ValueError, match="unknown op 'ffn'"):
        op_shape("ffn", narrow)


def test_norm_rows_share_an_sm_in_the_stream_bound():
    """One row of torch's rms_norm streams alone (its latency-bound loop sets small-batch time);
    up to NORM_ROWS_PER_SM rows an SM stream side by side before a second turn."""
    from costmodel.shapes import NORM_ROWS_PER_SM
    dims = ModelDims(d_model=4096, d_ff=1024, n_heads=32)
    row_s = 2 * 2 * 4096 * 132 / CEILINGS.hbm_bytes_per_s  # one row's loads and stores at an SM's fair share
    stream_s = {b: launch_times(op_launches("rms_norm", b, dims)[0], CEILINGS)[4]
                for b in (1, 132 * NORM_ROWS_PER_SM, 132 * NORM_ROWS_PER_SM + 1)}
    assert stream_s == pytest.approx({1: row_s, 132 * NORM_ROWS_PER_SM: row_s, 132 * NORM_ROWS_PER_SM + 1: 2 * row_s})
    assert launch_times(gemm(CONFIGS, "matmul", 16, 64 * 133, 2048), CEILINGS)[4] == pytest.approx(
        2 * launch_times(gemm(CONFIGS, "matmul", 16, 64, 2048), CEILINGS)[4])  # GEMM tiles: one an SM


def test_fp8_experts_launch_the_quantizations_and_read_fp8_tiles():
    """fused_experts_fp8: quantize the tokens, gate-up, quantize each slot, down, on the FP8 configs;
    expert_ffn_fp8 is the same for one expert every token picks; the weights' bytes and the tiles' bf16-rate
    FLOPs halve."""
    dims = ModelDims(d_model=4096, d_ff=14336, num_experts=8, top_k=2, n_heads=32)
    fp8_configs = {"moe_gate_up_fp8": {"entries": [{"config": {"block_m": 16, "block_n": 64, "block_k": 512}}]},
                   "moe_down_fp8": {"entries": [{"config": {"block_n": 128, "block_k": 256}}]}}
    quantize_x, gate_up, quantize_h, down = op_launches("fused_experts_fp8", 16, dims, fp8_configs)
    # rows of 4096 are read in one pass, two a program; rows of 14336 in two passes, four a program
    assert quantize_x.tiles == math.ceil(16 / 2) and quantize_h.tiles == math.ceil(16 * 2 / 4)
    # FP8 tensor cores run twice the bf16 rate the table measures: a tile counts half its FLOPs
    assert gate_up.tile_flops == 2.0 * 16 * 64 * 4096 * 2 / 2 and down.tile_flops == 2.0 * 16 * 128 * 14336 / 2
    bf16_gate_up, _ = op_launches("fused_experts", 16, dims)
    assert gate_up.nbytes / bf16_gate_up.nbytes == pytest.approx(0.5, rel=0.01), "FP8 weights: half the bytes"
    one_expert = op_launches("expert_ffn_fp8", 16, dims, fp8_configs)
    assert one_expert[1].tiles == math.ceil(16 / 16) * math.ceil(14336 / 64)
    (quantize,) = op_launches("quantize_fp8", 10, dims)
    assert quantize.tiles == 5 and quantize.nbytes == (2 + 1) * 10 * 4096 + 4 * 10


@pytest.mark.parametrize("tokens, d_model", [(1, 4096), (3, 2048), (64, 4096), (4096, 8192), (7, 14336), (100, 3000)])
def test_quantize_launch_follows_the_kernels_plan(tokens, d_model):
    """The cost model's quantize launch has the programs ``kernels.quantize.quantize_plan`` launches
    (one pass or two, rows per program), so the tile model's waves are the kernel's."""
    from kernels.quantize import quantize_plan
    (launch,) = op_launches("quantize_fp8", tokens, ModelDims(d_model=d_model, n_heads=1), CONFIGS)
    assert launch.tiles == math.ceil(tokens / quantize_plan(tokens, d_model)["BLOCK_M"])
