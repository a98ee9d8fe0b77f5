"""The all_to_all measurement on gloo (2 CPU processes), the calibration CLI, and its table merge.

Energy on CPU comes from ``tests.fake_nvml`` counters (one per rank), never a measurement."""
import argparse
import contextlib
import datetime
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import calibrate_comm
from calibration.collectives import check_sizes, measure_all_to_all
from calibration.nvml_meter import GpuMeter
from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from tests.conftest import usage_error
from tests.fake_nvml import FakeNvml
from tests.test_cost_comm import synthetic_collectives
from tests.test_cost_model import synthetic_table

WORLD_SIZE = 2
FAKE_POWER_W = 150.0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, *args):
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD_SIZE, join=True)


def _error(call):
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class BackwardsNvml(FakeNvml):
    """A board whose energy counter runs backwards (a wrapped or reset counter)."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return 10 ** 12 - super().nvmlDeviceGetTotalEnergyConsumption(handle)


def _measure_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        def metered(idle_power_w, trials):  # each rank's own fake board draws FAKE_POWER_W throughout
            return measure_all_to_all([4096], window_s=1.0, trials=trials, repeats=3,
                                      meter=GpuMeter(nvml=FakeNvml(power_w=FAKE_POWER_W)), idle_power_w=idle_power_w)
        results = {
            "plain": measure_all_to_all([1024, 65536], window_s=1.0, trials=1, repeats=5),
            "idle_equals_board": metered(FAKE_POWER_W, trials=2),
            "idle_below_board": metered(50.0, trials=1),
            "errors": [_error(lambda: measure_all_to_all([1024], window_s=0.5)),
                       _error(lambda: measure_all_to_all([1024], trials=0)),
                       _error(lambda: measure_all_to_all([1022]))],
            "bad_input": [_error(lambda: measure_all_to_all([1024], window_s=float("inf"))),
                          _error(lambda: measure_all_to_all([1024], window_s=True)),
                          _error(lambda: measure_all_to_all([1024], repeats=2.0)),
                          _error(lambda: measure_all_to_all([1024], idle_power_w=float("nan"))),
                          _error(lambda: measure_all_to_all([1024], idle_power_w=-5.0)),
                          _error(lambda: measure_all_to_all([1024], meter="gpu0")),
                          _error(lambda: measure_all_to_all(1024))],
            # rank 1's counter runs backwards: every rank refuses the window, none returns a negative energy
            "backwards": _error(lambda: measure_all_to_all(
                [4096], window_s=1.0, trials=1, repeats=3, idle_power_w=50.0,
                meter=GpuMeter(nvml=(BackwardsNvml if rank == 1 else FakeNvml)(power_w=FAKE_POWER_W)))),
        }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("collectives")
    spawn(_measure_worker, str(out_dir))
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_gloo_latency_without_energy(measured):
    curve = measured[0]["plain"]
    assert curve["backend"] == "gloo" and curve["world_size"] == WORLD_SIZE and curve["idle_power_w"] is None
    assert "no GPU (backend gloo)" in curve["energy_missing_reason"]
    assert [p["bytes_per_rank"] for p in curve["points"]] == [1024, 65536]
    for point in curve["points"]:
        assert point["latency_ms"] > 0 and point["world_size"] == WORLD_SIZE
        assert all(point[k] is None for k in ("energy_j", "energy_j_min", "energy_j_max", "power_w",
                                              "calls_per_window"))
    assert measured[1]["plain"] == curve, "every rank reports the slowest rank's latency"


def test_windows_subtract_idle_power_before_the_barrier_and_after_the_work(measured):
    """At idle power equal to the board's, each window's power is the board's, 2 x 150 W summed,
    within the counter's read jitter; without the subtraction the wait and the tail (up to 100 ms
    a window each) would add about 15 W on average."""
    curve = measured[0]["idle_equals_board"]
    point = curve["points"][0]
    assert curve["energy_missing_reason"] is None and curve["idle_power_w"] == pytest.approx(2 * FAKE_POWER_W)
    assert point["calls_per_window"] >= 1 and measured[1]["idle_equals_board"] == curve, "the same on every rank"
    assert point["power_w"] == pytest.approx(2 * FAKE_POWER_W, rel=0.01)
    assert 0 < point["energy_j_min"] <= point["energy_j"] <= point["energy_j_max"]
    shortest_window_s = point["energy_j_min"] * point["calls_per_window"] / (2 * FAKE_POWER_W)
    assert shortest_window_s >= 0.99, "every window lasts window_s (1 s) or more"


def test_energy_and_power_add_up_over_the_ranks(measured):
    """Each board draws 150 W, 50 W of it idle: 2 x 150 W over the work, plus 100 W per board over the
    wait and tail (under 0.2 s of a >= 1 s window)."""
    point = measured[0]["idle_below_board"]["points"][0]
    assert 2 * FAKE_POWER_W * 0.98 <= point["power_w"] <= 2 * FAKE_POWER_W + 2 * 100.0 * 0.25
    assert point["energy_j"] > 0 and point["energy_j_min"] == point["energy_j"] == point["energy_j_max"]


def test_bad_arguments_raise_before_any_collective(measured):
    window, trials, size = measured[0]["errors"]
    assert "window_s" in window and "trials" in trials and "sizes_bytes" in size and "multiple of 4" in size


@pytest.mark.parametrize("row, phrase", list(enumerate([
    "ValueError: window_s must be a finite number >= 1", "TypeError: window_s must be a real number",
    "TypeError: repeats must be an int", "ValueError: idle_power_w must be a finite number in [0,",
    "ValueError: idle_power_w must be a finite number in [0,", "TypeError: meter must be a calibration.nvml_meter",
    "TypeError: sizes_bytes must be a list",
])))
def test_bad_input_raises_before_any_collective(measured, row, phrase):
    assert measured[0]["bad_input"][row].startswith(phrase) and measured[1]["bad_input"][row].startswith(phrase)


def test_a_counter_running_backwards_is_an_error_on_every_rank(measured):
    for rank in range(WORLD_SIZE):
        message = measured[rank]["backwards"]
        assert message.startswith("RuntimeError: a window's energy came out -") and "ran backwards" in message


@pytest.mark.parametrize("sizes, world_size, error", [
    ([], 2, ValueError), ([0], 2, ValueError), ([-4], 2, ValueError), ([True], 1, TypeError),
    ([4096.0], 2, TypeError), ([4098], 4, ValueError), (4096, 2, TypeError), ("4096", 2, TypeError),
])
def test_check_sizes(sizes, world_size, error):
    with pytest.raises(error, match="sizes_bytes"):
        check_sizes(sizes, world_size)


def test_check_sizes_takes_numpy_ints():
    assert check_sizes([np.int64(4096)], 2) == [4096] and type(check_sizes([np.int64(4096)], 2)[0]) is int


# ---- bench.calibrate_comm ------------------------------------------------------------------------

def _cli_worker(rank, port, table, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = calibrate_comm.main(["--gpu", "TESTGPU", "--output", table, "--sizes", "4K", "64K", "--repeats", "3"])
    Path(out_dir, f"rank{rank}.txt").write_text(f"{status}\n{stdout.getvalue()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path; this machine has a GPU")
def test_cli_on_cpu_prints_latencies_and_writes_nothing(tmp_path):
    table = tmp_path / "TESTGPU.json"
    write_json_atomic(table, synthetic_table())
    before = table.read_text()
    spawn(_cli_worker, str(table), str(tmp_path))
    status, report = Path(tmp_path, "rank0.txt").read_text().split("\n", 1)
    assert status == "0" and "4 KiB" in report and "64 KiB" in report
    assert "energy not measured (no GPU (backend gloo)" in report and "nothing written" in report
    assert Path(tmp_path, "rank1.txt").read_text() == "0\n", "rank 0 alone reports"
    assert table.read_text() == before


def test_merge_keeps_other_keys_and_world_sizes(tmp_path):
    path = tmp_path / "t.json"
    original = synthetic_table() | {"collectives": synthetic_collectives((4,)), "gap_power_w": 120.0}
    write_json_atomic(path, original)
    entry = synthetic_collectives((2,))["all_to_all"]["2"] | {"method": "test data"}
    calibrate_comm.merge_curve(path, path, 2, entry)
    merged = json.loads(path.read_text())
    assert merged["collectives"]["all_to_all"] == {"4": original["collectives"]["all_to_all"]["4"], "2": entry}
    assert {k: v for k, v in merged.items() if k != "collectives"} == \
        {k: v for k, v in original.items() if k != "collectives"}
    model = KernelCostModel("TESTGPU", table=path)
    assert model.get_comm_cost("all_to_all", 2 ** 18, 2)["interpolation"] == "measured"


def test_merge_is_atomic(tmp_path):
    path = tmp_path / "t.json"
    write_json_atomic(path, synthetic_table())
    before = path.read_text()
    with pytest.raises(TypeError):
        calibrate_comm.merge_curve(path, path, 2, {"points": [object()]})  # fails mid-dump
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path], "old table intact, no temp file"
    with pytest.raises(ValueError, match="no cost table"):
        calibrate_comm.merge_curve(tmp_path / "missing.json", path, 2, {})


def test_merge_into_a_new_file_copies_the_whole_table(tmp_path):
    source, output = tmp_path / "TESTGPU.json", tmp_path / "new" / "comm.json"
    write_json_atomic(source, synthetic_table())
    entry = synthetic_collectives((2,))["all_to_all"]["2"]
    calibrate_comm.merge_curve(source, output, 2, entry)
    assert json.loads(output.read_text()) == synthetic_table() | {"collectives": {"all_to_all": {"2": entry}}}
    assert "collectives" not in json.loads(source.read_text())


def test_an_ops_sweep_keeps_the_collectives(tmp_path):
    from calibration.sweep import kept_collectives
    collectives = synthetic_collectives((2, 4))
    write_json_atomic(tmp_path / "t.json", synthetic_table() | {"collectives": collectives})
    (tmp_path / "corrupt.json").write_text("{ not json")
    assert kept_collectives(tmp_path / "t.json") == collectives
    assert kept_collectives(tmp_path / "missing.json") is None and kept_collectives(tmp_path / "corrupt.json") is None


@pytest.mark.parametrize("text, expected", [("65536", 65536), ("64K", 65536), ("64KiB", 65536), ("1m", 2 ** 20),
                                            ("2G", 2 ** 31)])
def test_parse_size(text, expected):
    assert calibrate_comm.parse_size(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "H100", "--sizes", "0"], "--sizes"), (["--gpu", "H100", "--sizes", "1.5M"], "--sizes"),
    (["--gpu", "H100", "--window_s", "0.5"], "--window_s"), (["--gpu", "H100", "--window_s", "inf"], "--window_s"),
    (["--gpu", "H100", "--window_s", "nan"], "--window_s"), (["--gpu", "../x"], "short name"),
    (["--gpu", "H100", "--trials", "0"], "--trials"), (["--gpu", "H100", "--repeats", "0"], "--repeats"),
    (["--gpu", "H100", "--output", "{dir}"], "--output {dir} is a directory"),
    (["--gpu", "H100", "--output", "{file}/c.json"], "is not a directory"),
])
def test_cli_bad_arguments(argv, message, tmp_path, capsys):
    err, paths = usage_error(calibrate_comm.parse_args, argv, tmp_path, capsys)
    assert message.format(**paths) in err


def test_cli_needs_torchrun_and_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        calibrate_comm.main(["--gpu", "H100"])
    assert "run under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        calibrate_comm.main(["--gpu", "B200", "--output", str(tmp_path / "none.json")])
    assert "no cost table" in capsys.readouterr().err, "a new --output needs the GPU's table to start from"
    write_json_atomic(tmp_path / "other.json", synthetic_table("A100"))
    with pytest.raises(SystemExit):
        calibrate_comm.main(["--gpu", "H100", "--output", str(tmp_path / "other.json")])
    assert "is for GPU 'A100', not 'H100'" in capsys.readouterr().err


def test_sizes_round_down_to_an_even_split():
    parser = argparse.ArgumentParser()
    assert calibrate_comm.even_sizes(parser, [65536, 65536, 4096], 3) == [4092, 65532]
    with pytest.raises(SystemExit):
        calibrate_comm.even_sizes(parser, [4], 3)
