"""``python -m bench.router_energy --smoke``: the benchmark's routing path end to end at tiny shapes."""
import json

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
