"""``python -m bench.router_energy --smoke``: the benchmark's routing path end to end at tiny shapes."""
import json

import pytest
import triton

from bench import router_energy
from tests.conftest import ON_GPU


def test_router_benchmark_smoke_writes_routing_figures(tmp_path, capsys):
    out = tmp_path / "router.json"
    assert router_energy.main(["--smoke", "--batches", "4", "--shapes", "tiny-E64-K8", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["provenance"]["torch"] and not data["timed"] and "no CUDA device" in data["time_null_reason"]
    routers = [row["router"] for row in data["rows"]]
    assert routers == ["plain", "bounded", "aggressive"]
    bounded, aggressive = data["rows"][1:]
    assert bounded["rerouted_fraction"] <= aggressive["rerouted_fraction"]
    assert aggressive["distinct_experts"] < aggressive["plain_distinct_experts"]
    assert aggressive["kl_increase"] >= 0 and "energy_j_per_token" not in aggressive
    assert "tiny-E64-K8" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--window_s", "nan"], "--window_s"), (["--window_s", "0.5"], "--window_s"), (["--trials", "0"], "--trials"),
    (["--held_out", "-3"], "--held_out"), (["--batches", "0"], "--batches"), (["--batches", "-4"], "--batches"),
    (["--batches", "abc"], "--batches"), (["--batches", "1,,2"], "--batches"), (["--batches", "4,4"], "--batches"),
    (["--shapes", ""], "--shapes"), (["--shapes", "tiny-E8-K2,nope"], "--shapes: unknown"),
    (["--output", "{dir}"], "--output"), (["--output", "{file}/x.json"], "--output"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [arg.format(dir=tmp_path, file=tmp_path / "file") for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        router_energy.main(["--smoke", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(ON_GPU, reason="the CPU path; on a GPU the command times every piece")
def test_router_overhead_checks_every_piece_and_reports_no_time_on_a_cpu(tmp_path, capsys):
    from bench import router_overhead
    out = tmp_path / "overhead.json"
    assert router_overhead.main(["--shapes", "olmoe", "--tokens", "1,3", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "no CUDA device" in data["timing_reason"] and [r["T"] for r in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert set(row["us_per_call"]) == {"gate_linear", "topk_router", "oea_router", "ours_router",
                                           "ours_router_no_monitor", "policy_kernel_active", "policy_kernel_cost",
                                           "state_copy"}
        assert all(v is None for v in row["us_per_call"].values()) and row["ours_minus_oea_us"] is None
    assert "policy_kernel_cost" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--shapes", "mixtral"], "--shapes"), (["--tokens", "0"], "--tokens"),
                                           (["--output", "{dir}"], "is a directory")])
def test_router_overhead_refuses_bad_arguments(argv, message, tmp_path, capsys):
    from bench import router_overhead
    with pytest.raises(SystemExit) as exit_info:
        router_overhead.parse_args([a.format(dir=tmp_path) for a in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_router_overhead_derives_the_splits():
    from bench.router_overhead import derived
    us = {"ours_router": 12.0, "oea_router": 5.0, "ours_router_no_monitor": 9.5, "policy_kernel_cost": 6.0,
          "policy_kernel_active": 3.0}
    assert derived(us) == {"ours_minus_oea_us": 7.0, "monitor_share_us": 2.5, "cost_path_in_kernel_us": 3.0}


def test_tune_routing_candidates_hold_the_default_and_respect_the_tile_cap():
    from bench.tune_routing import LADDERS, candidates, default_config
    for op in LADDERS:
        for T, E in ((1, 8), (5, 64), (64, 128), (1024, 256)):
            configs = candidates(op, T, E)
            assert default_config(T, E) in configs and len(configs) == len({tuple(c.values()) for c in configs})
            assert all(c["block_t"] <= min(4096 // triton.next_power_of_2(E), triton.next_power_of_2(T))
                       for c in configs)
    assert {c["block_t"] for c in candidates("topk_routing", 1, 64)} == {1}, "T=1: one row per program"


@pytest.mark.skipif(ON_GPU, reason="the CPU path")
def test_tune_routing_needs_a_gpu(tmp_path, capsys):
    from bench import tune_routing
    assert tune_routing.main(["--output", str(tmp_path / "t.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("argv, message", [(["--ops", "softmax"], "--ops"), (["--output", "{dir}"], "is a directory")])
def test_tune_routing_refuses_bad_arguments(argv, message, tmp_path, capsys):
    from bench import tune_routing
    with pytest.raises(SystemExit) as exit_info:
        tune_routing.parse_args([a.format(dir=tmp_path) for a in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_tune_routing_write_keeps_the_files_other_expert_counts(tmp_path):
    """A run over --experts 64 replaces E=64's entries and buckets, and keeps E=8's with their own provenance."""
    from bench.tune_routing import merged_with_file
    path = tmp_path / "NVIDIA_H200.json"
    old_entries = [{"when": {"max_e": 8, "max_t": 1}, "config": {"block_t": 1, "num_warps": 1}},
                   {"when": {"max_e": 8}, "config": {"block_t": 4, "num_warps": 1}},
                   {"when": {"max_e": 64, "max_t": 1}, "config": {"block_t": 1, "num_warps": 4}},
                   {"config": {"block_t": 64, "num_warps": 4}}]  # the default fallback write_tuned appends
    path.write_text(json.dumps({"entries": old_entries, "tuned": {"provenance": {"date_utc": "old"}, "buckets": [
        {"E": 8, "T": 1, "best": {}}, {"E": 64, "T": 1, "best": {}}]}}))
    new_entries = [{"when": {"max_e": 64, "max_t": 16}, "config": {"block_t": 4, "num_warps": 2}},
                   {"when": {"max_e": 64}, "config": {"block_t": 4, "num_warps": 2}}]
    entries, buckets = merged_with_file(path, new_entries, [{"E": 64, "T": 16, "provenance": "new"}], {64})
    assert entries == old_entries[:2] + new_entries
    assert buckets == [{"provenance": {"date_utc": "old"}, "E": 8, "T": 1, "best": {}},
                       {"E": 64, "T": 16, "provenance": "new"}]
    assert merged_with_file(tmp_path / "none.json", new_entries, [], {64}) == (new_entries, [])


def test_tune_routing_experts_flag():
    from bench.tune_routing import parse_args
    assert parse_args(["--experts", "128,64"]).experts == [(64, 8), (128, 8)]
    with pytest.raises(SystemExit):
        parse_args(["--experts", "96"])
