"""``python -m bench.kcm_replay``: the cost model against committed measurements, on a CPU."""
import json

import pytest

from bench import kcm_replay
from bench.harness.replay import KERNEL_CHANGES, earlier_kernel, leave_one_out, op_shape, point_dims
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims

RESULTS = ["bench/results/kcm_accuracy_NVIDIA_H100_80GB_HBM3.json",
           "bench/results/dense_kernels_NVIDIA_H100_80GB_HBM3.json",
           "bench/results/fused_moe_NVIDIA_H100_80GB_HBM3.json"]


def test_replay_reads_every_kind_of_results_file(tmp_path, capsys):
    assert kcm_replay.main(["--gpu", "H100", *RESULTS, "--output", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["inputs"]) == set(RESULTS) and report["provenance"]["commit"]
    files = {row["file"] for row in report["rows"]}
    assert files == set(RESULTS), "each file gives rows"
    accuracy_report = json.loads(open(RESULTS[0]).read())
    measured_utc = accuracy_report["provenance"]["date_utc"]
    model = KernelCostModel("H100")
    at_measured = [r for r in accuracy_report["rows"] if (r["held_out"] == "batch"
                   or model.is_measured_shape(r["op"], ModelDims(**r["dims"])))
                   and not earlier_kernel(r["op"], r["batch_size"], measured_utc, r["dims"]["top_k"])]
    assert len(at_measured) > 87  # the held-out batch sizes, and held-out shapes' ops at a swept op shape
    # energy at a shape the sweep timed without windows is modelled: those rows count as modelled energy
    metered = [r for r in at_measured if model.get_cost(r["op"], r["batch_size"],
                                                        dims=ModelDims(**r["dims"]))["energy_source"] != "modelled"]
    assert report["at_measured_shapes_energy"]["n"] == len(metered) < len(at_measured)
    # the fused-MoE file's model shapes: some the sweep ran (Mixtral's experts), some it never did
    assert {"modelled", "measured"} <= {r["source"] for r in report["rows"] if r["file"] == RESULTS[2]}
    for row in report["rows"]:
        assert row["predicted_latency_ms"] > 0 and row["measured_latency_ms"] > 0
    assert "leave_one_out tile_model_energy" in capsys.readouterr().out


def test_rows_measured_before_a_kernel_change_are_apart(tmp_path):
    """A row measured before its op's kernel changed is flagged and summarised apart; one measured after,
    or at a batch size the change did not touch, counts; no such row becomes a leave-one-report-out point."""
    from bench.harness.replay import with_report_points
    decode = next(c for c in KERNEL_CHANGES if c.batch_sizes == (1,))
    before, after = "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"
    assert earlier_kernel(decode.ops[0], 1, before).startswith(decode.commit)
    assert earlier_kernel(decode.ops[0], 2, before) is None or not earlier_kernel(decode.ops[0], 2, before).startswith(
        decode.commit)
    assert earlier_kernel(decode.ops[0], 1, after) is None and earlier_kernel("ffn_gate", 1, before) is None
    assert earlier_kernel("quantize_fp8", 4, None) is None  # undated files count as current
    dims = {"d_model": 512, "d_ff": 1536, "n_heads": 4, "seq_len": 512, "num_experts": 8, "top_k": 2,
            "vocab_size": 256}
    rows = [{"op": "quantize_fp8", "batch_size": 4, "dims": dims, "held_out": "shape",
             "measured_latency_ms": 0.004, "measured_energy_j": 1e-4}]
    table = KernelCostModel("H100").table
    for utc, added in ((before, 0), (after, 1)):
        report = {"provenance": {"date_utc": utc}, "forward_rows": [], "rows": rows}
        widened = with_report_points(table, [report])
        assert len(widened["ops"]["quantize_fp8"]["points"]) - len(table["ops"]["quantize_fp8"]["points"]) == added
        path = tmp_path / f"{added}.json"
        path.write_text(json.dumps(report))
        assert kcm_replay.main(["--gpu", "H100", str(path), "--output", str(tmp_path / "r.json")]) == 0
        summary = json.loads((tmp_path / "r.json").read_text())
        assert ("earlier_kernel_latency" in summary) == (added == 0)
        assert ("modelled_shapes_latency" in summary) == (added == 1)


def test_a_change_to_decode_sized_calls_covers_their_slots_only():
    """The one-launch grouping changed calls of at most 256 (token, expert) slots: 48 tokens at top 4
    (192 slots) measured before it ran another kernel, at top 8 (384) the same one."""
    grouping = next(c for c in KERNEL_CHANGES if c.max_slots)
    before = "2026-12-05T00:00:00+00:00"
    assert earlier_kernel("fused_experts", 48, before, top_k=4).startswith(grouping.commit)
    assert earlier_kernel("fused_experts", 48, before, top_k=8) is None
    assert earlier_kernel("fused_experts", 48, grouping.date_utc, top_k=4) is None


def test_leave_one_out_never_sees_the_point_it_predicts():
    table = KernelCostModel("H100").table
    rows = leave_one_out(table)
    assert {r["method"] for r in rows} == {"tile_model", "log_log"}
    per_shape = {}
    for op, entry in table["ops"].items():
        for p in (p for p in entry["points"] if p.get("energy_j")):  # latency-only points are not held out
            key = op, op_shape(op, point_dims(table, p))
            per_shape[key] = per_shape.get(key, 0) + 1
    inner = sum(max(n - 2, 0) for n in per_shape.values())  # each measured shape keeps its two ends
    assert len(per_shape) > len(table["ops"]), "the table holds more than one shape per op"
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


def test_leave_one_report_out_predicts_each_report_from_the_others_only():
    from bench.harness.replay import leave_one_report_out, with_report_points
    from costmodel.curves import ShapeModel
    table = KernelCostModel("H100").table
    names = ["bench/results/kcm_accuracy_2026-12-07b_NVIDIA_H100_80GB_HBM3.json",
             "bench/results/kcm_accuracy_2026-12-07c_NVIDIA_H100_80GB_HBM3.json"]
    reports = {name: json.loads(open(name).read()) for name in names}
    widened = with_report_points(table, [reports[names[1]]])
    added = sum(map(len, (e["points"] for e in widened["ops"].values()))) - sum(
        map(len, (e["points"] for e in table["ops"].values())))
    assert added > 0 and with_report_points(widened, [reports[names[1]]]) == widened  # no point twice
    measured_utc = reports[names[1]]["provenance"]["date_utc"]
    for r in reports[names[1]]["rows"]:  # every op's held-out shape rows on today's kernels became that op's points
        if r.get("dims") and r["op"] in table["ops"] and not earlier_kernel(r["op"], r["batch_size"], measured_utc,
                                                                            r["dims"]["top_k"]):
            assert any(p.get("dims") == r["dims"] and p["batch_size"] == r["batch_size"]
                       for p in widened["ops"][r["op"]]["points"]), (r["op"], r["batch_size"])
    rows = leave_one_report_out(table, reports)
    assert {r["file"] for r in rows} == set(names) and len(rows) % 3 == 0
    first = [r for r in rows if r["file"] == names[0] and r["method"] == "with_other_reports"]
    from_other = ShapeModel(widened)
    for r in first:  # the first report's rows see the second's points, never their own
        dims = ModelDims(**r["dims"])
        assert not from_other.curve(r["op"], dims).measured_batches
        assert r["predicted_latency_ms"] == pytest.approx(from_other.curve(r["op"], dims).at(r["batch_size"])[0])
    alone = [r for r in rows if r["method"] == "table_alone"]
    assert any(a["predicted_latency_ms"] != w["predicted_latency_ms"] for a, w in
               zip(alone, (r for r in rows if r["method"] == "with_other_reports")))
    latency_only = [r for r in rows if r["method"] == "with_other_reports_latency_only"]
    timed = ShapeModel(with_report_points(table, [reports[names[1]]], metered=False))
    added_points = [p for e in timed.table["ops"].values() for p in e["points"] if "flops" not in p]
    assert len(added_points) == added and all(p["energy_j"] is None for p in added_points)
    for r in (r for r in latency_only if r["file"] == names[0]):  # latency as the metered points', energy its own
        dims = ModelDims(**r["dims"])
        assert r["predicted_latency_ms"] == pytest.approx(timed.curve(r["op"], dims).at(r["batch_size"])[0])
        assert r["predicted_energy_j"] == pytest.approx(timed.curve(r["op"], dims).at(r["batch_size"])[1])
    single = leave_one_report_out(table, {names[0]: reports[names[0]]})  # no other report: the table alone
    for method in ("with_other_reports", "with_other_reports_latency_only"):
        pairs = zip((r for r in single if r["method"] == "table_alone"), (r for r in single if r["method"] == method))
        assert all(a["predicted_latency_ms"] == w["predicted_latency_ms"] for a, w in pairs)
