"""``python -m bench.router_energy --smoke``: the benchmark's routing path end to end at tiny shapes."""
import json

import pytest

from bench import router_energy


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
