"""``python -m bench.kcm_replay``: the cost model against committed measurements, on a CPU."""
import json

import pytest

from bench import kcm_replay
from bench.harness.replay import leave_one_out
from costmodel.kernel_cost_model import KernelCostModel

RESULTS = ["bench/results/kcm_accuracy_NVIDIA_H100_80GB_HBM3.json",
           "bench/results/dense_kernels_NVIDIA_H100_80GB_HBM3.json",
           "bench/results/fused_moe_NVIDIA_H100_80GB_HBM3.json"]


def test_replay_reads_every_kind_of_results_file(tmp_path, capsys):
    assert kcm_replay.main(["--gpu", "H100", *RESULTS, "--output", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["inputs"]) == set(RESULTS) and report["provenance"]["commit"]
    files = {row["file"] for row in report["rows"]}
    assert files == set(RESULTS), "each file gives rows"
    assert report["at_table_dims_energy"]["n"] == 87  # the accuracy report's held-out kernel points
    assert {r["source"] for r in report["rows"] if r["file"] == RESULTS[2]} == {"modelled"}
    for row in report["rows"]:
        assert row["predicted_latency_ms"] > 0 and row["measured_latency_ms"] > 0
    assert "leave_one_out tile_model_energy" in capsys.readouterr().out


def test_leave_one_out_never_sees_the_point_it_predicts():
    table = KernelCostModel("H100").table
    rows = leave_one_out(table)
    assert {r["method"] for r in rows} == {"tile_model", "log_log"}
    inner = sum(len(e["points"]) - 2 for e in table["ops"].values())  # one measured shape per op
    assert len(rows) == 2 * inner
    # had the fit seen the point, the curve would pass through it exactly
    assert all(r["predicted_energy_j"] != pytest.approx(r["measured_energy_j"], rel=1e-9) for r in rows
               if r["method"] == "tile_model")


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "H100", "missing.json"], "results file missing.json"),
    (["--gpu", "NOPE", RESULTS[0]], "--gpu: no cost table for NOPE"),
])
def test_bad_arguments_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        kcm_replay.main(argv + ["--output", str(tmp_path / "r.json")])
    assert message in capsys.readouterr().err
