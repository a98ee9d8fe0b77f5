"""KernelCostModel: table loading, interpolation, factors, bad input (the device form: test_cost_device.py;
collectives: test_cost_comm.py; shapes: test_shape_model.py).

The measured-style table here is synthetic test data built in this file (a power law with
known exponents), never a committed or reported measurement."""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from calibration.priors import PRIOR_TABLES, prior_table
from calibration.results import write_json_atomic
from costmodel.device import DeviceCostTable
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import FP8_OPS, OPS, ModelDims
from costmodel.table import TABLE_DIR, TABLES_ENV, table_names, user_table_dir
from tests.conftest import DEVICE

BATCHES = (1, 4, 16, 64, 256)


def synthetic_table(gpu="TESTGPU", thermal=True):
    """latency_ms = 0.01 * b^0.5, energy_j = 0.002 * b^0.8 for every op."""
    ops = {op: {"points": [{"batch_size": b, "latency_ms": 0.01 * b ** 0.5, "energy_j": 0.002 * b ** 0.8,
                            "power_w": 0.002 * b ** 0.8 / (1e-5 * b ** 0.5), "memory_gb": 0.001 * b}
                           for b in BATCHES]} for op in OPS}
    return {"schema": 1, "gpu": gpu, "source": "measured", "dims": asdict(ModelDims()), "idle_power_w": 73.0,
            "peak_flops": 9.0e14, "hbm_bytes_per_s": 3.0e12,
            "thermal": {"ambient_c": 30.0, "resistance_c_per_w": 0.05, "time_constant_s": 20.0, "slowdown_temp_c": 87,
                        "shutdown_temp_c": 95,
                        "clock_vs_temp": [{"temp_c": 40, "sm_clock_mhz": 1980}, {"temp_c": 60, "sm_clock_mhz": 1980},
                                          {"temp_c": 70, "sm_clock_mhz": 1800}]} if thermal else None,
            "ops": ops}


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "TESTGPU.json"
    write_json_atomic(path, synthetic_table())
    return path


def test_measured_interpolated_extrapolated(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    exact = model.get_cost("ffn_gate", 16)
    assert exact["source"] == "measured" and exact["prediction"] is True
    assert exact["latency_ms"] == pytest.approx(0.04) and exact["energy_joules"] == pytest.approx(0.002 * 16 ** 0.8)
    mid = model.get_cost("ffn_gate", 32)  # between measured points: inside their span, labelled so
    assert mid["source"] == "interpolated"
    assert 0.01 * 16 ** 0.5 < mid["latency_ms"] < 0.01 * 64 ** 0.5
    assert 0.002 * 16 ** 0.8 < mid["energy_joules"] < 0.002 * 64 ** 0.8
    far = model.get_cost("ffn_gate", 1024)  # beyond them the tile model carries the trend: more work, more time
    last = model.get_cost("ffn_gate", 256)
    assert far["source"] == "extrapolated" and far["latency_ms"] > last["latency_ms"]
    assert far["energy_joules"] > last["energy_joules"]
    assert mid["power_w"] == pytest.approx(mid["energy_joules"] / (mid["latency_ms"] * 1e-3))


def test_memory_pressure_stretches_time_and_static_energy(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    base = model.get_cost("ffn_down", 64)
    pressed = model.get_cost("ffn_down", 64, memory_pressure=0.5)
    assert pressed["latency_ms"] >= base["latency_ms"]
    extra_s = (pressed["latency_ms"] - base["latency_ms"]) * 1e-3
    assert pressed["energy_joules"] == pytest.approx(base["energy_joules"] + 73.0 * extra_s)
    assert model.get_cost("ffn_down", 64, memory_pressure=0.0) == base


def with_pressure_curve(table):
    """ffn_down's measured stretch: 1 alone, 1.2 at 40% background utilisation, 2.0 at 80%."""
    points = [{"share": s, "background_util": u, "pair_util": None, "latency_ms": 1.0, "stretch": k}
              for s, u, k in ((0.0, 0.0, 1.0), (0.5, 0.4, 1.2), (0.9, 0.8, 2.0))]
    return table | {"memory_pressure": {"ops": {"ffn_down": {"batch_size": 64, "points": points}}}}


def test_measured_pressure_curve_replaces_the_roofline(tmp_path):
    write_json_atomic(tmp_path / "t.json", with_pressure_curve(synthetic_table()))
    model = KernelCostModel("TESTGPU", table=tmp_path / "t.json")
    base = model.get_cost("ffn_down", 64)
    half = model.get_cost("ffn_down", 64, memory_pressure=0.6)  # halfway between 1.2 and 2.0
    assert half["latency_ms"] == pytest.approx(base["latency_ms"] * 1.6) and half["source"] == "measured"
    beyond = model.get_cost("ffn_down", 64, memory_pressure=0.9)  # the last segment, extended
    assert beyond["latency_ms"] == pytest.approx(base["latency_ms"] * 2.2) and beyond["source"] == "extrapolated"
    roofline = model.get_cost("ffn_gate", 64, memory_pressure=0.6)  # no curve for ffn_gate: roofline share
    assert roofline["latency_ms"] >= model.get_cost("ffn_gate", 64)["latency_ms"]


def test_thermal_impact_and_safe_batch(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    cool, hot = model.get_cost("swiglu_ffn", 64, current_temp=35.0), model.get_cost("swiglu_ffn", 64, current_temp=80.0)
    assert hot["temp_impact"] < cool["temp_impact"], "a hotter card heats less (closer to steady state)"
    rises = {b: model.get_cost("swiglu_ffn", b, current_temp=35.0)["temp_impact"] for b in (16, 32, 64)}
    assert rises[16] < rises[32] < rises[64], "bigger calls heat more"
    bound = (rises[32] + rises[64]) / 2
    assert model.get_thermal_safe_batch_size("swiglu_ffn", current_temp=35.0, max_temp_increase=bound) == 32


def test_clock_vs_temperature_stretches_latency(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    base = model.get_cost("ffn_gate", 16)
    assert model.get_cost("ffn_gate", 16, current_temp=50.0)["latency_ms"] == pytest.approx(base["latency_ms"])
    warm = model.get_cost("ffn_gate", 16, current_temp=65.0)  # clock 1890 MHz, interpolated
    assert warm["latency_ms"] == pytest.approx(base["latency_ms"] * 1980 / 1890) and warm["source"] == "measured"
    hot = model.get_cost("ffn_gate", 16, current_temp=80.0)
    assert hot["source"] == "extrapolated" and hot["latency_ms"] == pytest.approx(base["latency_ms"] * 1980 / 1800)
    assert "warning" not in hot
    assert "slowdown threshold" in model.get_cost("ffn_gate", 16, current_temp=90.0)["warning"]


def test_breakdown_sums(table_path):
    parts = KernelCostModel("TESTGPU", table=table_path).get_cost_breakdown("fused_experts", 64)
    assert parts["static_energy_joules"] + parts["dynamic_energy_joules"] == pytest.approx(parts["energy_joules"])
    assert parts["compute_bound_ms"] + parts["memory_bound_ms"] == pytest.approx(parts["latency_ms"])


@pytest.mark.parametrize("gpu", PRIOR_TABLES)
def test_committed_priors_are_labelled_priors(gpu):
    model = KernelCostModel(gpu)
    assert model.table["source"] == "prior" and "not a measurement" in model.table["note"]
    fp8 = "fp8_peak_tflops" in model.table["datasheet"]
    for op in OPS:
        if op in FP8_OPS and not fp8:
            with pytest.raises(ValueError, match=f"{gpu} has no FP8"):
                model.get_cost(op, 37)
            continue
        cost = model.get_cost(op, 37, current_temp=50.0, memory_pressure=0.3)
        assert cost["source"] == "prior" and cost["temp_impact"] is None
        assert all(math.isfinite(cost[k]) and cost[k] > 0 for k in ("energy_joules", "latency_ms", "power_w"))
    assert model.get_thermal_safe_batch_size("ffn_gate", 50.0, 5.0) is None


def test_committed_priors_match_the_generator(gpu="A100"):
    assert json.loads(KernelCostModel(gpu).path.read_text()) == json.loads(json.dumps(prior_table(gpu)))


BAD = [
    ("unknown op", lambda m: m.get_cost("conv2d", 8), ValueError),
    ("batch_size", lambda m: m.get_cost("ffn_gate", 0), ValueError),
    ("batch_size", lambda m: m.get_cost("ffn_gate", -3), ValueError),
    ("batch_size", lambda m: m.get_cost("ffn_gate", float("nan")), ValueError),
    ("batch_size", lambda m: m.get_cost("ffn_gate", "8"), TypeError),
    ("batch_size", lambda m: m.get_cost("ffn_gate", True), TypeError),
    ("current_temp", lambda m: m.get_cost("ffn_gate", 8, current_temp=float("nan")), ValueError),
    ("current_temp .*absolute zero", lambda m: m.get_cost("ffn_gate", 8, current_temp=-300.0), ValueError),
    ("current_temp .*shutdown threshold", lambda m: m.get_cost("ffn_gate", 8, current_temp=95.0), ValueError),
    ("current_temp .*shutdown threshold", lambda m: m.get_cost("ffn_gate", 8, current_temp=1e6), ValueError),
    ("current_temp", lambda m: m.get_cost("ffn_gate", 8, current_temp="hot"), TypeError),
    ("memory_pressure", lambda m: m.get_cost("ffn_gate", 8, memory_pressure=1.5), ValueError),
    ("memory_pressure", lambda m: m.get_cost("ffn_gate", 8, memory_pressure=-0.1), ValueError),
    ("memory_pressure", lambda m: m.get_cost("ffn_gate", 8, memory_pressure=float("nan")), ValueError),
    ("memory_pressure 1.0 leaves ffn_gate no HBM", lambda m: m.get_cost("ffn_gate", 8, memory_pressure=1.0),
     ValueError),
    ("max_temp_increase", lambda m: m.get_thermal_safe_batch_size("ffn_gate", 40.0, 0), ValueError),
    ("current_temp", lambda m: m.get_thermal_safe_batch_size("ffn_gate", None, 5.0), TypeError),
    ("current_temp .*shutdown threshold", lambda m: m.get_thermal_safe_batch_size("ffn_gate", 95.0, 5.0), ValueError),
]


@pytest.mark.parametrize("match, call, error", BAD, ids=[f"{m[:24]}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input(table_path, match, call, error):
    with pytest.raises(error, match=match):
        call(KernelCostModel("TESTGPU", table=table_path))


def test_numpy_numbers_are_numbers(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    assert model.get_cost("ffn_gate", np.int64(16), current_temp=np.float32(50.0)) == \
        model.get_cost("ffn_gate", 16, current_temp=50.0)
    assert model.get_plan_cost([("ffn_gate", np.int32(16), np.int64(2))])["latency_ms"] == \
        pytest.approx(2 * model.get_cost("ffn_gate", 16)["latency_ms"])


def test_no_batch_is_thermally_safe_at_the_slowdown_threshold(tmp_path):
    table = synthetic_table()
    table["thermal"] |= {"resistance_c_per_w": 0.5, "time_constant_s": 1e-3}  # steady states far above slowdown
    write_json_atomic(tmp_path / "hot.json", table)
    model = KernelCostModel("TESTGPU", table=tmp_path / "hot.json")  # slowdown 87 °C, shutdown 95 °C
    for temp_c in (87.0, 94.0):
        with pytest.warns(RuntimeWarning, match="at or above the TESTGPU's slowdown threshold"):
            assert model.get_thermal_safe_batch_size("swiglu_ffn", current_temp=temp_c, max_temp_increase=50.0) == 0
    start_c = 80.0
    rises = {b: model.get_cost("swiglu_ffn", b, current_temp=start_c)["temp_impact"] for b in BATCHES}
    assert rises[1] < 87.0 - start_c < rises[256], "the test needs a batch that crosses the threshold"
    safe = model.get_thermal_safe_batch_size("swiglu_ffn", current_temp=start_c, max_temp_increase=50.0)
    assert start_c + model.get_cost("swiglu_ffn", safe, current_temp=start_c)["temp_impact"] < 87.0
    assert start_c + model.get_cost("swiglu_ffn", 2 * safe, current_temp=start_c)["temp_impact"] >= 87.0


def test_clock_curve_listed_hot_to_cold_predicts_as_sorted(tmp_path, table_path):
    table = synthetic_table()
    table["thermal"]["clock_vs_temp"].reverse()
    write_json_atomic(tmp_path / "reversed.json", table)
    reversed_model = KernelCostModel("TESTGPU", table=tmp_path / "reversed.json")
    model = KernelCostModel("TESTGPU", table=table_path)
    for temp_c in (35.0, 65.0, 80.0):
        assert reversed_model.get_cost("ffn_gate", 16, current_temp=temp_c) == \
            model.get_cost("ffn_gate", 16, current_temp=temp_c)
    device = DeviceCostTable(reversed_model, ["ffn_gate"], DEVICE)
    _, latency = device.predict("ffn_gate", torch.tensor([16.0], device=DEVICE), temp_c=torch.tensor(65.0, device=DEVICE))
    assert latency.item() == pytest.approx(model.get_cost("ffn_gate", 16, current_temp=65.0)["latency_ms"], rel=1e-5)


def test_pressure_never_shortens_a_call(tmp_path):
    table = synthetic_table() | {"memory_pressure": {"ops": {"ffn_gate": {"points": [
        {"background_util": 0.0, "stretch": 0.97}, {"background_util": 0.5, "stretch": 0.5}]}}}}
    write_json_atomic(tmp_path / "t.json", table)
    model = KernelCostModel("TESTGPU", table=tmp_path / "t.json")
    base = model.get_cost("ffn_gate", 16)["latency_ms"]
    assert model.get_cost("ffn_gate", 16, memory_pressure=0.4)["latency_ms"] == pytest.approx(base)
    _, latency = DeviceCostTable(model, ["ffn_gate"], DEVICE).predict(
        "ffn_gate", torch.tensor([16.0], device=DEVICE), memory_pressure=torch.tensor(0.4, device=DEVICE))
    assert latency.item() == pytest.approx(base, rel=1e-5)


def test_plan_entries_are_checked(table_path):
    model = KernelCostModel("TESTGPU", table=table_path)
    with pytest.raises(ValueError, match=r"plan entries must be \(op, batch_size, calls\)"):
        model.get_plan_cost(["swiglu_ffn"])
    with pytest.raises(TypeError, match="plan must be a list"):
        model.get_plan_cost({"swiglu_ffn": 4})
    with pytest.raises(TypeError, match="measured_latency_ms"):
        model.get_plan_cost([("ffn_gate", 16, 1)], measured_latency_ms=True)
    total = model.get_plan_cost([("ffn_gate", 16, np.int64(2))])
    assert all(type(total[k]) is float for k in ("energy_joules", "latency_ms"))


def test_bad_tables(tmp_path, table_path):
    with pytest.raises(ValueError, match="no cost table"):
        KernelCostModel("B200")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt"):
        KernelCostModel(table=corrupt, gpu_type=None)
    with pytest.raises(ValueError, match="is for GPU 'TESTGPU', not 'H200'"):
        KernelCostModel("H200", table=table_path)
    with pytest.raises(ValueError, match="is not a file"):
        KernelCostModel(table=tmp_path, gpu_type=None)
    with pytest.raises(TypeError, match="table must be a path"):
        KernelCostModel(table=3, gpu_type=None)
    with pytest.raises(TypeError, match="gpu_type must be a str"):
        KernelCostModel(gpu_type=100)
    for name in ("", "../H100", "H 100"):
        with pytest.raises(ValueError, match="gpu_type must be a table name"):
            KernelCostModel(name)


def _set(table, keys, value):
    """``table`` with the field at the path ``keys`` set to ``value`` (or deleted for ``DELETE``)."""
    node = table
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return table


DELETE = object()
FIRST_POINT = ("ops", "ffn_gate", "points", 0)
CORRUPT_TABLES = [
    (FIRST_POINT + ("energy_j",), -1.0, r"ops\['ffn_gate'\]\['points'\]\[0\]\['energy_j'\]"),
    (FIRST_POINT + ("energy_j",), math.nan, r"\['energy_j'\] must be a finite number, got nan"),
    (FIRST_POINT + ("latency_ms",), math.inf, r"\['latency_ms'\] must be a finite number, got inf"),
    (FIRST_POINT + ("latency_ms",), "0.1", r"\['latency_ms'\] must be a finite number"),
    (FIRST_POINT + ("memory_gb",), DELETE, "has no 'memory_gb' field"),
    (FIRST_POINT + ("batch_size",), DELETE, "has no 'batch_size' field"),
    (FIRST_POINT + ("batch_size",), 4, "repeated batch_size values"),
    (("ops", "ffn_gate", "points"), [], "has no points"),
    (("ops", "conv2d"), {"points": []}, "not an op the cost model knows"),
    (("idle_power_w",), math.nan, r"\['idle_power_w'\] must be a finite number"),
    (("peak_flops",), DELETE, "has no 'peak_flops' field"),
    (("hbm_bytes_per_s",), 0, r"\['hbm_bytes_per_s'\] must be in"),
    (("dims", "d_model"), 0, "'dims' d_model must be a positive int"),
    (("dims", "width"), 3, "'dims' has unknown fields"),
    (("gpu",), None, "'gpu' must be a non-empty string"),
    (("source",), "guess", "'source' must be 'measured' or 'prior'"),
    (("thermal", "ambient_c"), -300.0, r"\['ambient_c'\] must be in"),
    (("thermal", "time_constant_s"), DELETE, "has no 'time_constant_s'"),
    (("thermal", "clock_vs_temp", 1, "temp_c"), 40, "repeated temp_c values"),
    (("thermal", "clock_vs_temp", 0, "sm_clock_mhz"), math.nan, r"\['sm_clock_mhz'\] must be a finite number"),
    (("memory_pressure",), {"ops": {"ffn_gate": {"points": [{"background_util": 0.0, "stretch": 1.0},
                                                            {"background_util": 1.5, "stretch": 2.0}]}}},
     r"\['background_util'\] must be in \[0.0, 1.0\]"),
    (("memory_pressure",), {"ops": {"ffn_gate": {"points": [{"background_util": 0.5, "stretch": 1.0},
                                                            {"background_util": 0.5, "stretch": 2.0}]}}},
     "repeated background_util values"),
    (FIRST_POINT + ("batch_size",), 10 ** 400, r"\['batch_size'\] must be a finite number"),  # beyond float
    (FIRST_POINT + ("energy_j",), 1e30, "above any GPU's power"),
    (("thermal", "shutdown_temp_c"), 30.0, r"\['shutdown_temp_c'\] must be in \(30.0"),  # below ambient
    (("thermal", "slowdown_temp_c"), 99.0, "slowdown_temp_c 99.0 above shutdown_temp_c 95"),
    (("thermal", "ambient_c"), 1e6, r"\['ambient_c'\] must be in"),
    (("collectives",), {"all_to_all": {"02": {"source": "measured", "points": [
        {"bytes_per_rank": 1024, "latency_ms": 0.1, "energy_j": 0.01}]}}}, "plain digits"),
]


@pytest.mark.parametrize("keys, value, match", CORRUPT_TABLES,
                         ids=[f"{'.'.join(map(str, k))}-{i}" for i, (k, _, _) in enumerate(CORRUPT_TABLES)])
def test_corrupt_tables_are_refused_at_load(tmp_path, keys, value, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_set(synthetic_table(), keys, value)))  # json writes NaN/Infinity literals
    with pytest.raises(ValueError, match=f"corrupt: .*{match}"):
        KernelCostModel(table=path, gpu_type=None)


def test_plan_cost_sums_calls_and_charges_gaps(tmp_path):
    write_json_atomic(tmp_path / "t.json", synthetic_table() | {"gap_power_w": 120.0})
    model = KernelCostModel("TESTGPU", table=tmp_path / "t.json")
    plan = [("ffn_gate", 16, 3), ("flash_attention", 4, 2)]
    parts = [model.get_cost(op, b) for op, b, _ in plan]
    kernel_ms = 3 * parts[0]["latency_ms"] + 2 * parts[1]["latency_ms"]
    total = model.get_plan_cost(plan, measured_latency_ms=kernel_ms + 2.0)  # 2 ms of launch gaps
    assert total["kernel_latency_ms"] == pytest.approx(kernel_ms) and total["latency_ms"] == pytest.approx(kernel_ms + 2)
    assert total["energy_joules"] == pytest.approx(3 * parts[0]["energy_joules"] + 2 * parts[1]["energy_joules"]
                                                   + 120.0 * 2e-3)
    with pytest.raises(ValueError, match="measured_latency_ms"):
        model.get_plan_cost(plan, measured_latency_ms=-1.0)
    with pytest.raises(ValueError, match="calls"):
        model.get_plan_cost([("ffn_gate", 16, -2)])
    with pytest.raises(ValueError, match="unknown op"):
        model.get_plan_cost([("conv2d", 16, 1)])


# ---- collectives ---------------------------------------------------------------------------------

def test_a_user_table_is_found_before_the_packaged_one(monkeypatch, tmp_path):
    """A calibration written to $ENERGY_MOE_TABLES is what KernelCostModel("H100") reads; without
    one the packaged table is; the packaged file is never the one a user's run replaces."""
    packaged = KernelCostModel("H100")
    assert packaged.path == TABLE_DIR / "H100.json"
    user = tmp_path / "mine"
    monkeypatch.setenv(TABLES_ENV, str(user))
    write_json_atomic(user / "H100.json", synthetic_table("H100"))
    mine = KernelCostModel("H100")
    assert mine.path == user / "H100.json" and mine.table["ops"] != packaged.table["ops"]
    assert "H100" in table_names() and "TESTGPU" not in table_names()


def test_user_table_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(TABLES_ENV, str(tmp_path / "t"))
    assert user_table_dir() == tmp_path / "t"
    monkeypatch.delenv(TABLES_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert user_table_dir() == tmp_path / "cache" / "energy-moe" / "tables"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_table_dir() == tmp_path / "home" / ".cache" / "energy-moe" / "tables"


def test_a_missing_table_names_the_command_and_a_case_near_match():
    with pytest.raises(ValueError, match=r"did you mean 'H100'\?.*python -m bench.calibrate --gpu h100"):
        KernelCostModel("h100")
    with pytest.raises(ValueError, match="no cost table for B200") as info:
        KernelCostModel("B200")
    assert "did you mean" not in str(info.value) and "python -m bench.calibrate --gpu B200" in str(info.value)


def test_a_table_path_alone_is_for_whatever_gpu_it_holds(tmp_path):
    path = tmp_path / "a100.json"
    write_json_atomic(path, synthetic_table("A100"))
    assert KernelCostModel(table=path).gpu_type == "A100"
    with pytest.raises(ValueError, match="is for GPU 'A100', not 'H100'"):
        KernelCostModel("H100", table=path)
    assert KernelCostModel().gpu_type == "H100", "the seed API's default"
