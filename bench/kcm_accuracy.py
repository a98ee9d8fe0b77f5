"""``python -m bench.kcm_accuracy --gpu H100``: the cost model's predictions against new measurements.

Measures every op at batch sizes *not* on the calibration grid (same method as
``bench.calibrate``) and compares the table's predictions with them: median and 90th-percentile
absolute percentage error, for energy and latency. The NVML counter itself has a board-to-board
gain error of about ±5% (Yang et al., SC'24), so these errors are relative to this card's meter.
Whole-model forward passes join this report once the benchmark harness's models exist.
"""
import argparse
import statistics
import sys

import torch

from bench._results import provenance, write_json_atomic
from bench.calibrate import check_gpu, sweep_point
from calibration.energy import measure_idle_power_w
from calibration.nvml_meter import GpuMeter
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import SEQUENCE_OPS

HELD_OUT_TOKENS = (2, 12, 48, 192, 768, 3072)
HELD_OUT_SEQUENCES = (3, 6, 12, 24, 48)
MEASURED_NOISE_NOTE = ("relative to this card's NVML energy counter, whose board-to-board gain error is about "
                       "±5% (Yang et al., SC'24)")


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(rows, key):
    errors = [abs(r[f"predicted_{key}"] - r[f"measured_{key}"]) / r[f"measured_{key}"] * 100 for r in rows]
    return {"median_ape_pct": statistics.median(errors), "p90_ape_pct": percentile(errors, 0.9), "n": len(errors)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kcm_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--table", default=None, help="default: calibration/tables/<gpu>.json")
    parser.add_argument("--output", default="kcm_accuracy.json")
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args(argv)
    meter = GpuMeter(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    check_gpu(parser, args.gpu, meter)
    model = KernelCostModel(args.gpu, table=args.table)
    if model.is_prior:
        parser.error(f"the {args.gpu} table is a prior: calibrate first (python -m bench.calibrate --gpu {args.gpu})")
    idle_power_w = measure_idle_power_w(meter)
    rows = []
    for op in model.ops:
        for batch_size in HELD_OUT_SEQUENCES if op in SEQUENCE_OPS else HELD_OUT_TOKENS:
            measured = sweep_point(op, batch_size, model.dims, meter, idle_power_w, 1.0, args.trials)
            predicted = model.get_cost(op, batch_size)
            rows.append({"op": op, "batch_size": batch_size, "source": predicted["source"],
                         "measured_energy_j": measured["energy_j"], "predicted_energy_j": predicted["energy_joules"],
                         "measured_latency_ms": measured["latency_ms"], "predicted_latency_ms": predicted["latency_ms"]})
            print(f"{op:16} {batch_size:5d}: energy {rows[-1]['predicted_energy_j']:.3e} predicted vs "
                  f"{rows[-1]['measured_energy_j']:.3e} J measured", file=sys.stderr, flush=True)
    report = {"provenance": provenance(), "table": str(model.path), "note": MEASURED_NOISE_NOTE,
              "targets": {"energy": "median <= 5%, p90 <= 10%", "latency": "median <= 3%, p90 <= 10%"},
              "energy": summarise(rows, "energy_j"), "latency": summarise(rows, "latency_ms"), "rows": rows}
    write_json_atomic(args.output, report)
    for key in ("energy", "latency"):
        print(f"{key}: median APE {report[key]['median_ape_pct']:.1f}%, p90 {report[key]['p90_ape_pct']:.1f}% "
              f"over {report[key]['n']} held-out points ({MEASURED_NOISE_NOTE})")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
