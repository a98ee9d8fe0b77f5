"""``python -m bench.kcm_replay --gpu H100 bench/results/<file>.json ...``: the cost model against
measurements already committed, on any machine (``bench.harness.replay`` says which files it reads).

Rows at a shape the table measured (the dims the op reads, ``costmodel.ops.OP_DIMS``) test
held-out batch sizes; rows at other shapes test the shape-general model alone. The report groups
them so (``at_measured_shapes`` / ``modelled_shapes``), with each input file's
provenance, adds the table's own leave-one-out test (``leave_one_out``: the tile model against
log-log interpolation between neighbouring points) and, given two or more accuracy reports, what
measuring more shapes would buy (``leave_one_report_out``: each report's modelled rows predicted with
the other reports' shapes added to the table), and is written atomically.
"""
import argparse
import json
import sys
from pathlib import Path

from bench._cli import add_table_flags, checked_output_file, cost_model_from
from bench.harness.accuracy import summarise
from bench.harness.replay import leave_one_out, leave_one_report_out, replay_rows
from calibration.results import provenance, write_json_atomic


# a row's group, given the row and the key of its source ("source" for latency, "energy_source" for energy)
GROUPS = {"at_measured_shapes": lambda r, source: not r["earlier_kernel"] and r[source] != "modelled",
          "modelled_shapes": lambda r, source: not r["earlier_kernel"] and r[source] == "modelled",
          "earlier_kernel": lambda r, source: bool(r["earlier_kernel"])}


def summaries(rows: list) -> dict:
    """{group_quantity: summary} for the rows at measured shapes and at modelled ones (for energy: at
    shapes with measured energy, ``energy_source``), and apart, the rows measured on an earlier kernel
    than the model describes (``earlier_kernel``)."""
    out = {}
    for group, keep in GROUPS.items():
        for key, source in (("latency_ms", "source"), ("energy_j", "energy_source")):
            measured = [r for r in rows if f"measured_{key}" in r and keep(r, source)]
            if measured:
                out[f"{group}_{key.split('_')[0]}"] = summarise(measured, key)
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kcm_replay", description=__doc__.split("\n\n")[0])
    add_table_flags(parser)
    parser.add_argument("results", nargs="+", help="committed results files (kcm_accuracy, dense kernels, fused MoE)")
    parser.add_argument("--output", default="kcm_replay.json")
    args = parser.parse_args(argv)
    args.output = checked_output_file(parser, args.output)
    model = cost_model_from(parser, args)
    reports = {}
    for path in map(Path, args.results):
        try:
            reports[str(path)] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            parser.error(f"results file {path}: {exc}")
    rows = [row for name, report in reports.items() for row in replay_rows(model, name, report)]
    if not rows:
        parser.error("no row of these files has an op the cost model predicts")
    held = leave_one_out(model.table)
    loo = {f"{method}_{key.split('_')[0]}": summarise([r for r in held if r["method"] == method], key)
           for method in ("tile_model", "log_log") for key in ("energy_j", "latency_ms")}
    accuracy_reports = {name: r for name, r in reports.items() if "forward_rows" in r}
    crossed = leave_one_report_out(model.table, accuracy_reports) if len(accuracy_reports) > 1 else []
    by_report = {f"{method}_{key.split('_')[0]}": summarise([r for r in crossed if r["method"] == method], key)
                 for method in ("table_alone", "with_other_reports", "with_other_reports_latency_only")
                 for key in ("energy_j", "latency_ms")
                 if crossed}
    report = {"provenance": provenance(), "label": "predictions of this commit's cost model against committed "
              "measurements; the measurements' own provenance is per input",
              "table": str(model.path), "table_provenance": model.table.get("provenance"),
              "inputs": {name: r.get("provenance") for name, r in reports.items()}, **summaries(rows),
              "leave_one_out": loo, "leave_one_report_out": by_report, "rows": rows, "leave_one_out_rows": held,
              "leave_one_report_out_rows": crossed}
    write_json_atomic(args.output, report)
    printed = (summaries(rows) | {f"leave_one_out {k}": v for k, v in loo.items()}
               | {f"leave_one_report_out {k}": v for k, v in by_report.items()})
    for key, summary in printed.items():
        print(f"{key}: median APE {summary['median_ape_pct']:.1f}%, p90 {summary['p90_ape_pct']:.1f}%, "
              f"median signed {summary['median_signed_pct']:+.1f}% over {summary['n']} points")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
