"""Predictions of the current cost model against measurements already committed in
``bench/results`` (``python -m bench.kcm_replay``): no GPU needed, and every measured figure
comes from a results file with its own provenance.

``leave_one_out`` tests the table on its own points: each inner point of each measured shape
is predicted from the table without it, by the tile model and by straight log-log interpolation
between its neighbours (the cost model before the tile fit), to show each method's bias.

``leave_one_report_out`` asks what measuring more shapes would buy: each accuracy report's rows at
op shapes the table never measured are predicted by the table alone and by the table with the
*other* reports' held-out shape points added as measured points (``with_report_points``), which
the shape-general model then corrects from (``costmodel.curves``).

Three kinds of file are read:
- a ``bench.kcm_accuracy`` report: its held-out kernel rows (energy and latency, at the table's
  dims or at held-out shapes, as each row says);
- a ``bench.bench_kernels`` dense report (``dense_kernels_*.json``): CUDA-graph latency of our
  flash attention, SwiGLU FFN and projections at model-sized shapes;
- a ``bench.bench_moe`` report (``fused_moe_*.json``): CUDA-graph latency of the fused experts at
  Mixtral, Qwen3-MoE and OLMoE shapes.
"""
import copy
import datetime
import json
from dataclasses import dataclass

from costmodel.curves import ShapeModel, log_log_at, point_dims
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims, op_shape


@dataclass(frozen=True)
class KernelChange:
    """A kernel change after which an earlier measurement of ``ops`` (at ``batch_sizes``; None: all)
    times another kernel than the one the table and the cost model now describe."""
    commit: str
    date_utc: str  # the commit's date, compared with a results file's ``provenance.date_utc``
    ops: tuple
    what: str
    batch_sizes: "tuple | None" = None
    max_slots: "int | None" = None  # only calls of at most this many (token, expert) slots changed

    def covers(self, op: str, batch_size: float, measured_utc: str, top_k: int = 1) -> bool:
        """Whether a row of ``op`` at ``batch_size`` (each token routed to ``top_k`` experts) measured at
        ``measured_utc`` predates this change."""
        measured = datetime.datetime.fromisoformat(measured_utc)
        return (op in self.ops and measured < datetime.datetime.fromisoformat(self.date_utc)
                and (self.batch_sizes is None or batch_size in self.batch_sizes)
                and (self.max_slots is None or batch_size * top_k <= self.max_slots))


# the changes that made a committed measurement stale, newest first (README, the replay section)
KERNEL_CHANGES = (
    KernelChange("fccdea8", "2026-12-07T18:45:13+00:00", ("quantize_fp8", "fused_experts_fp8", "expert_ffn_fp8"),
                 "the FP8 row quantizer reads a row of up to 8192 elements once (3.8 -> 1.7 us at one row of 4096)"),
    KernelChange("b443e02", "2026-12-07T13:40:10+00:00", ("fused_experts", "fused_experts_fp8", "expert_ffn_fp8"),
                 "one token runs on DecodeSlots, without the layout launch (Qwen3 shape 0.044 -> 0.037 ms)", (1,)),
    KernelChange("110538b", "2026-12-07T09:47:57+00:00", ("moe_router",),
                 "routing reads the logits' row stride as a constexpr (1.6-3x at 60 and 120 experts)"),
    KernelChange("323f77d", "2026-12-07T09:21:11+00:00", ("flash_attention",),
                 "flash attention's softmax scale rides in the exp2 argument (2-4%)"),
    KernelChange("a7238f2", "2026-12-07T05:33:28+00:00", ("fused_experts",),
                 "decode-sized calls group their slots by expert in one launch (was two fills and three launches)",
                 max_slots=256),
)


def earlier_kernel(op: str, batch_size: float, measured_utc: "str | None", top_k: int = 1) -> "str | None":
    """``"<commit>: <what>"`` of the newest ``KERNEL_CHANGES`` entry a row of ``op`` at ``batch_size`` (and
    ``top_k``) measured at ``measured_utc`` predates, else None (a file without a date counts as current)."""
    if not measured_utc:
        return None
    return next((f"{c.commit}: {c.what}" for c in KERNEL_CHANGES if c.covers(op, batch_size, measured_utc, top_k)),
                None)


def _measured_utc(report):
    return (report.get("provenance") or {}).get("date_utc")


def _dense_case(row):
    """(op, batch_size, dims) of a dense-kernels row the cost model has an op for, else None."""
    shape, case = row["shape"], row["case"]
    if case.startswith("flash_attention") and shape["H_kv"] == shape["H"]:
        dims = ModelDims(d_model=shape["H"] * shape["D"], n_heads=shape["H"], seq_len=shape["S"])
        return "flash_attention", shape["B"], dims
    if case.startswith("swiglu_ffn"):
        return "swiglu_ffn", shape["T"], ModelDims(d_model=shape["H"], d_ff=shape["I"], n_heads=1)
    if case.startswith("ffn_gate"):
        return "ffn_gate", shape["T"], ModelDims(d_model=shape["K"], d_ff=shape["N"], n_heads=1)
    if case.startswith("ffn_down"):
        return "ffn_down", shape["T"], ModelDims(d_model=shape["N"], d_ff=shape["K"], n_heads=1)
    return None


def _row(model, source_file, measured_utc, op, batch_size, dims, measured_latency_ms, measured_energy_j=None):
    cost = model.get_cost(op, batch_size, dims=dims)
    row = {"file": source_file, "op": op, "batch_size": batch_size, "dims": cost["dims"], "source": cost["source"],
           "energy_source": cost["energy_source"], "measured_latency_ms": measured_latency_ms,
           "predicted_latency_ms": cost["latency_ms"],
           "earlier_kernel": earlier_kernel(op, batch_size, measured_utc, dims.top_k)}
    if measured_energy_j is not None:
        row |= {"measured_energy_j": measured_energy_j, "predicted_energy_j": cost["energy_joules"]}
    return row


def replay_rows(model: KernelCostModel, name: str, report: dict) -> list:
    """The rows of one results file ``report`` (named ``name``), each measured beside predicted, and
    ``earlier_kernel`` where the measurement predates a change to the op's kernel (``KERNEL_CHANGES``)."""
    utc = _measured_utc(report)
    if "forward_rows" in report:  # a kcm_accuracy report
        return [_row(model, name, utc, r["op"], r["batch_size"],
                     ModelDims(**r["dims"]) if r.get("dims") else model.table_dims,
                     r["measured_latency_ms"], r["measured_energy_j"]) for r in report["rows"]]
    rows = []
    for r in report["rows"]:
        if "case" in r:
            case = _dense_case(r)
            if case and r.get("ours_graph_ms"):
                rows.append(_row(model, name, utc, *case, r["ours_graph_ms"]))
        elif {"T", "E", "K", "H", "I"} <= set(r) and r.get("ours_graph_ms"):
            dims = ModelDims(d_model=r["H"], d_ff=r["I"], n_heads=1, num_experts=r["E"], top_k=r["K"])
            rows.append(_row(model, name, utc, "fused_experts", r["T"], dims, r["ours_graph_ms"]))
    return rows


def leave_one_out(table: dict) -> list:
    """Rows of (op, batch_size, measured and predicted energy and latency) for every inner point
    of every measured shape of ``table``, by "tile_model" and by "log_log" interpolation."""
    rows = []
    for op, entry in table["ops"].items():
        shapes = {op_shape(op, point_dims(table, p)): point_dims(table, p) for p in entry["points"]}
        for shape, dims in shapes.items():
            points = sorted((p for p in entry["points"] if op_shape(op, point_dims(table, p)) == shape
                             and p.get("energy_j")), key=lambda p: p["batch_size"])
            for held in points[1:-1]:
                rest = [p for p in points if p is not held]
                without = copy.deepcopy(table)
                without["ops"] = {op: {"points": [p for p in entry["points"] if p is not held]}}
                latency_ms, energy_j, _ = ShapeModel(without).curve(op, dims).at(held["batch_size"])
                xs = [p["batch_size"] for p in rest]
                for method, latency, energy in (
                        ("tile_model", latency_ms, energy_j),
                        ("log_log", log_log_at(xs, [p["latency_ms"] for p in rest], held["batch_size"]),
                         log_log_at(xs, [p["energy_j"] for p in rest], held["batch_size"]))):
                    rows.append({"method": method, "op": op, "batch_size": held["batch_size"],
                                 "measured_latency_ms": held["latency_ms"], "predicted_latency_ms": latency,
                                 "measured_energy_j": held["energy_j"], "predicted_energy_j": energy})
    return rows


def _shape_rows(report, table):
    """The metered held-out shape rows (rows with ``dims``) of an accuracy ``report`` for ops ``table`` has,
    measured on the kernels the table describes (no ``earlier_kernel``)."""
    utc = _measured_utc(report)
    return [r for r in report["rows"]
            if r.get("dims") and r["op"] in table["ops"] and r.get("measured_energy_j") is not None
            and not earlier_kernel(r["op"], r["batch_size"], utc, r["dims"]["top_k"])]


def _point_key(op, dims, batch_size):
    return op, json.dumps(dims, sort_keys=True), batch_size


def with_report_points(table: dict, reports: list, metered: bool = True) -> dict:
    """A copy of ``table`` with every held-out shape row of the accuracy ``reports`` added to its op as a
    measured point (without ``metered``, as a latency-only point: ``energy_j`` null, as the sweep's
    latency shapes); a (dims, batch size) the table already has keeps the table's."""
    out = copy.deepcopy(table)
    seen = {_point_key(op, p.get("dims") or out["dims"], p["batch_size"])
            for op, entry in out["ops"].items() for p in entry["points"]}
    for report in reports:
        for r in _shape_rows(report, out):
            if _point_key(r["op"], r["dims"], r["batch_size"]) in seen:
                continue
            seen.add(_point_key(r["op"], r["dims"], r["batch_size"]))
            out["ops"][r["op"]]["points"].append({"batch_size": r["batch_size"], "latency_ms": r["measured_latency_ms"],
                                                  "energy_j": r["measured_energy_j"] if metered else None,
                                                  "memory_gb": 0.0,
                                                  "dims": r["dims"]})
    return out


def leave_one_report_out(table: dict, reports: dict) -> list:
    """Rows (``method`` "table_alone", "with_other_reports" or "with_other_reports_latency_only") of each
    accuracy report's held-out rows at an op shape neither table measured, predicted by ``table`` and by
    ``with_report_points`` of the other ``reports`` ({name: report}), metered or latency-only."""
    alone, rows = ShapeModel(table), []
    for name, report in reports.items():
        others = [r for n, r in reports.items() if n != name]
        widened = {method: ShapeModel(with_report_points(table, others, metered))
                   for method, metered in (("with_other_reports", True), ("with_other_reports_latency_only", False))}
        for r in _shape_rows(report, table):
            dims = ModelDims(**r["dims"])
            curves = {"table_alone": alone.curve(r["op"], dims)} | {
                method: model.curve(r["op"], dims) for method, model in widened.items()}
            if any(curve.measured_batches for curve in curves.values()):
                continue
            for method, curve in curves.items():
                latency_ms, energy_j, _ = curve.at(r["batch_size"])
                rows.append({"method": method, "file": name, "op": r["op"], "batch_size": r["batch_size"],
                             "dims": r["dims"], "measured_latency_ms": r["measured_latency_ms"],
                             "predicted_latency_ms": latency_ms, "measured_energy_j": r["measured_energy_j"],
                             "predicted_energy_j": energy_j})
    return rows
