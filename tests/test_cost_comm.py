"""KernelCostModel's collective costs: log-log between measured message sizes, linear beyond.

The curves here are synthetic test data built in this file, never a measurement."""
import pytest

from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from tests.test_cost_model import synthetic_table
from tests.test_cost_model import table_path as table_path  # noqa: F401 (the fixture)


COMM_SIZES = (2 ** 16, 2 ** 18, 2 ** 20, 2 ** 22)


def synthetic_collectives(world_sizes=(2,)):
    """all_to_all: latency_ms = 0.01 * (b / 64 KiB)^0.5, energy_j = 1e-3 * (b / 64 KiB)^0.9, per world size
    scaled by it (test data, not a measurement)."""
    def curve(world_size):
        return {"source": "measured", "points": [
            {"bytes_per_rank": b, "world_size": world_size, "latency_ms": 0.01 * world_size * (b / 2 ** 16) ** 0.5,
             "energy_j": 1e-3 * world_size * (b / 2 ** 16) ** 0.9} for b in reversed(COMM_SIZES)]}  # unsorted on disk
    return {"all_to_all": {str(w): curve(w) for w in world_sizes}}


@pytest.fixture
def comm_model(tmp_path):
    write_json_atomic(tmp_path / "comm.json", synthetic_table() | {"collectives": synthetic_collectives((2, 4))})
    return KernelCostModel("TESTGPU", table=tmp_path / "comm.json")


def test_comm_cost_interpolates_log_log_and_extends_linearly(comm_model):
    exact = comm_model.get_comm_cost("all_to_all", 2 ** 18, 2)
    assert exact["interpolation"] == "measured" and exact["source"] == "measured" and exact["prediction"] is True
    assert exact["latency_ms"] == pytest.approx(0.02 * 2) and exact["energy_joules"] == pytest.approx(2e-3 * 4 ** 0.9)
    mid = comm_model.get_comm_cost("all_to_all", 2 ** 19, 4)  # a power law: log-log interpolation is exact
    assert mid["interpolation"] == "interpolated"
    assert mid["latency_ms"] == pytest.approx(0.04 * 8 ** 0.5)
    assert mid["energy_joules"] == pytest.approx(4e-3 * 8 ** 0.9)
    above = comm_model.get_comm_cost("all_to_all", 2 ** 24, 2)  # the last segment, linear in bytes
    (x0, l0, e0), (x1, l1, e1) = [(b, 0.02 * (b / 2 ** 16) ** 0.5, 2e-3 * (b / 2 ** 16) ** 0.9) for b in COMM_SIZES[2:]]
    assert above["interpolation"] == "extrapolated"
    assert above["latency_ms"] == pytest.approx(l1 + (l1 - l0) / (x1 - x0) * (2 ** 24 - x1))
    assert above["energy_joules"] == pytest.approx(e1 + (e1 - e0) / (x1 - x0) * (2 ** 24 - x1))
    below = comm_model.get_comm_cost("all_to_all", 2 ** 12, 2)
    assert below["interpolation"] == "extrapolated"
    assert below["latency_ms"] == pytest.approx(0.02 - 0.02 * (2 - 1) / (2 ** 18 - 2 ** 16) * (2 ** 16 - 2 ** 12))
    assert below["energy_joules"] >= 2e-3 * 2 ** 12 / 2 ** 16, "never cheaper per byte than the smallest size"


def test_comm_cost_per_byte_is_the_secant_around_the_size(comm_model):
    def cost(b, w=2):
        return 1e-3 * w * (b / 2 ** 16) ** 0.9, 0.01 * w * (b / 2 ** 16) ** 0.5

    def secant(lo, hi, w=2):
        return tuple((c1 - c0) / (hi - lo) for c0, c1 in zip(cost(lo, w), cost(hi, w)))
    assert comm_model.comm_cost_per_byte("all_to_all", 3 * 2 ** 16, 2) == pytest.approx(secant(2 ** 16, 2 ** 18))
    assert comm_model.comm_cost_per_byte("all_to_all", 2 ** 18, 4) == pytest.approx(secant(2 ** 16, 2 ** 20, 4)), \
        "at an inner measured size: its two neighbours"
    assert comm_model.comm_cost_per_byte("all_to_all", 2 ** 30, 2) == pytest.approx(secant(2 ** 20, 2 ** 22))
    assert comm_model.comm_cost_per_byte("all_to_all", 1, 2) == pytest.approx(secant(2 ** 16, 2 ** 18))
    energy_per_byte, latency_per_byte = comm_model.comm_cost_per_byte("all_to_all", 2 ** 20, 2)
    assert energy_per_byte > 0 and latency_per_byte > 0


def test_noisy_first_segment_keeps_costs_positive(tmp_path):
    collectives = synthetic_collectives()
    smallest, second = collectives["all_to_all"]["2"]["points"][-1], collectives["all_to_all"]["2"]["points"][-2]
    smallest["latency_ms"] = second["latency_ms"] * 2  # timed slower than the next size (noise)
    second["energy_j"] = smallest["energy_j"] * 10  # superlinear: its line would go negative below the range
    write_json_atomic(tmp_path / "t.json", synthetic_table() | {"collectives": collectives})
    model = KernelCostModel("TESTGPU", table=tmp_path / "t.json")
    assert model.comm_cost_per_byte("all_to_all", 2 ** 17, 2)[1] == 0.0, "more bytes never cost less"
    tiny = model.get_comm_cost("all_to_all", 2 ** 12, 2)
    assert tiny["energy_joules"] == pytest.approx(smallest["energy_j"] / 16), "the smallest size's cost per byte"


BAD_COMM = [
    ("unknown collective op 'all_reduce'", lambda m: m.get_comm_cost("all_reduce", 2 ** 20, 2), ValueError),
    ("bytes_per_rank", lambda m: m.get_comm_cost("all_to_all", 0, 2), ValueError),
    ("bytes_per_rank", lambda m: m.comm_cost_per_byte("all_to_all", -5, 2), ValueError),
    ("bytes_per_rank", lambda m: m.get_comm_cost("all_to_all", True, 2), TypeError),
    ("bytes_per_rank", lambda m: m.get_comm_cost("all_to_all", float("inf"), 2), ValueError),
    ("world_size", lambda m: m.get_comm_cost("all_to_all", 2 ** 20, 2.0), TypeError),
    ("world_size", lambda m: m.get_comm_cost("all_to_all", 2 ** 20, True), TypeError),
    ("world_size", lambda m: m.get_comm_cost("all_to_all", 2 ** 20, 0), ValueError),
    (r"world_size 8 has no all_to_all curve .*measured world sizes: \[2, 4\]",
     lambda m: m.comm_cost_per_byte("all_to_all", 2 ** 20, 8), ValueError),
]


@pytest.mark.parametrize("match, call, error", BAD_COMM,
                         ids=[f"{m[:16]}-{i}" for i, (m, _, _) in enumerate(BAD_COMM)])
def test_comm_bad_input(comm_model, match, call, error):
    with pytest.raises(error, match=match):
        call(comm_model)


def test_comm_needs_a_collectives_section(table_path, tmp_path):
    with pytest.raises(ValueError, match="no collectives section: .*bench.calibrate_comm"):
        KernelCostModel("TESTGPU", table=table_path).get_comm_cost("all_to_all", 2 ** 20, 2)
    bad = synthetic_collectives()
    bad["all_to_all"]["2"]["points"][0]["energy_j"] = None  # an unmeasured energy is no cost
    write_json_atomic(tmp_path / "bad.json", synthetic_table() | {"collectives": bad})
    with pytest.raises(ValueError, match=r"corrupt: collectives\['all_to_all'\]"):
        KernelCostModel("TESTGPU", table=tmp_path / "bad.json")


# ---- where tables are found ------------------------------------------------------------------------
