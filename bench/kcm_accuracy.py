"""``python -m bench.kcm_accuracy --gpu H100``: the cost model's predictions against new measurements.

Measures every op at batch sizes *not* on the calibration grid, at the table's dims, and at
``HELD_OUT_SHAPES``, dims no sweep runs (same method as ``bench.calibrate``), and compares the
table's predictions with them: median, 90th-percentile and maximum absolute percentage error and
the median signed error (bias), for energy and latency, for held-out batch sizes and held-out
shapes apart. Then whole-model forwards: the harness's
dense and MoE transformers (``bench.harness.models``) at the table's dims, each forward predicted as the
sum of its ops' costs (``TransformerLM.cost_plan``) plus power over the gaps between kernels.
Two ways of running them: CUDA-graph replays (no gaps: a pure prediction) and eager calls (the
gap time is the measured forward latency minus the predicted kernel time, charged at the table's
measured gap power, so the eager energy prediction leans on that one measured latency: the
report says so). The NVML counter
itself has a board-to-board gain error of about ±5% (Yang et al., SC'24), so these errors are
relative to this card's meter.
"""
import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from bench._cli import add_table_flags, check_gpu, checked_output_file, cost_model_from, model_dims, positive_int
from bench.harness.accuracy import summarise
from bench.harness.models import TransformerLM
from calibration.energy import EagerRunner, GraphRunner, measure_energy
from calibration.nvml_meter import GpuMeter
from calibration.results import provenance, write_json_atomic
from calibration.sweep import measure_constants, partial_path, sweep_point
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.curves import point_dims
from costmodel.ops import SEQUENCE_OPS, ModelDims

HELD_OUT_TOKENS = (2, 12, 48, 192, 768, 3072)
HELD_OUT_SEQUENCES = (3, 6, 12, 24, 48)
HELD_OUT_SHAPES = (  # none is in calibration.sweep.SHAPE_SWEEP or LATENCY_SHAPES: the fit never saw them
    ModelDims(d_model=512, d_ff=2048, n_heads=8, seq_len=512, num_experts=8, top_k=2, vocab_size=8192),
    ModelDims(d_model=1536, d_ff=6144, n_heads=12, seq_len=1024, num_experts=16, top_k=4, vocab_size=32000),
    ModelDims(d_model=2048, d_ff=1024, n_heads=16, seq_len=2048, num_experts=64, top_k=8, vocab_size=50304),
)
SHAPE_TOKENS = (3, 48, 768)
SHAPE_SEQUENCES = (3, 12)
FORWARD_BATCHES = (1, 3, 6)  # sequences of the table's seq_len
FORWARD_LAYERS = 4
TARGETS = {"energy": "median <= 5%, p90 <= 10%, |median signed| <= 2%",
           "latency": "median <= 3%, p90 <= 8%, |median signed| <= 2%", "forward_energy": "<= 10% each"}
MEASURED_NOISE_NOTE = ("relative to this card's NVML energy counter, whose board-to-board gain error is about "
                       "±5% (Yang et al., SC'24)")


def kernel_rows(model: KernelCostModel, meter: GpuMeter, idle_power_w: float, trials: int,
                shapes: Sequence[ModelDims] = HELD_OUT_SHAPES, batches: bool = True,
                save: Callable[[list], None] | None = None) -> list:
    """Held-out points: batch sizes off the grid at the table's dims ("batch", unless not
    ``batches``), then ``shapes`` ("shape", one window each), each measured and predicted;
    ``save(rows)`` after each, so an interrupted run keeps what it measured."""
    plan = [("batch", model.dims, op, b, trials) for op in (model.ops if batches else ())
            for b in (HELD_OUT_SEQUENCES if op in SEQUENCE_OPS else HELD_OUT_TOKENS)]
    plan += [("shape", dims, op, b, 1) for dims in shapes for op in model.ops
             for b in (SHAPE_SEQUENCES if op in SEQUENCE_OPS else SHAPE_TOKENS)]
    rows = []
    for held_out, dims, op, batch_size, windows in plan:
        measured, _ = sweep_point(op, batch_size, dims, meter, idle_power_w, 1.0, windows)
        predicted = model.get_cost(op, batch_size, dims=dims)
        rows.append({"held_out": held_out, "op": op, "batch_size": batch_size, "dims": predicted["dims"],
                     "source": predicted["source"], "measured_energy_j": measured["energy_j"],
                     "predicted_energy_j": predicted["energy_joules"], "measured_latency_ms": measured["latency_ms"],
                     "predicted_latency_ms": predicted["latency_ms"]})
        print(f"{op:17} {batch_size:5d} d_model {dims.d_model:5d}: energy {rows[-1]['predicted_energy_j']:.3e} "
              f"predicted vs {rows[-1]['measured_energy_j']:.3e} J measured", file=sys.stderr, flush=True)
        if save:
            save(rows)
    return rows


def predict_forward(model: KernelCostModel, lm: TransformerLM, batch_size: int,
                    measured_latency_ms: float | None = None) -> tuple:
    """(energy_j, kernel latency_ms) of one forward: its ops' costs, plus the table's gap power over
    (measured latency - predicted kernel time) when the forward's measured latency is given (eager)."""
    cost = model.get_plan_cost(lm.cost_plan(batch_size), measured_latency_ms)
    return cost["energy_joules"], cost["kernel_latency_ms"]


def forward_rows(model: KernelCostModel, meter: GpuMeter, idle_power_w: float, trials: int) -> list:
    rows = []
    for moe in (False, True):
        lm = TransformerLM(model.dims, FORWARD_LAYERS, moe=moe, device="cuda", dtype=torch.bfloat16)
        for batch_size in FORWARD_BATCHES:
            tokens = torch.randint(0, model.dims.vocab_size, (batch_size, model.dims.seq_len), device="cuda")
            for mode, runner in (("graph", GraphRunner(lambda: lm(tokens))), ("eager", EagerRunner(lambda: lm(tokens)))):
                measured = measure_energy(meter, runner.run_for, idle_power_w, window_s=1.0, trials=trials)
                energy_j, latency_ms = predict_forward(model, lm, batch_size,
                                                       runner.latency_ms if mode == "eager" else None)
                rows.append({"model": "moe" if moe else "dense", "layers": FORWARD_LAYERS, "mode": mode,
                             "batch_size": batch_size, "measured_energy_j": measured["energy_j"],
                             "predicted_energy_j": energy_j, "measured_latency_ms": runner.latency_ms,
                             "predicted_latency_ms": latency_ms})
                print(f"{rows[-1]['model']:5} {mode:5} B={batch_size}: energy {energy_j:.3e} predicted vs "
                      f"{measured['energy_j']:.3e} J measured", file=sys.stderr, flush=True)
    return rows


def summaries(rows: list, forwards: list) -> dict:
    """The report's error summaries: all held-out kernel points, then held-out batch sizes and
    held-out shapes apart, and the held-out shape points the model alone predicts (``shape_modelled``). Forward latency is summarised for graph replays only: an eager
    forward's time is mostly host launch overhead, which the table does not model."""
    graphs = [r for r in forwards if r["mode"] == "graph"]
    forward_parts = {"forward_energy": summarise(forwards, "energy_j"),
                     "forward_latency": summarise(graphs, "latency_ms")} if forwards else {}
    groups = {kind: [r for r in rows if r.get("held_out", "batch") == kind] for kind in ("batch", "shape")}
    groups["shape_modelled"] = [r for r in groups["shape"] if r["source"] == "modelled"]
    parts = {f"{kind}_{key}": summarise(group, f"{key}_{unit}") for kind, group in groups.items() if group
             for key, unit in (("energy", "j"), ("latency", "ms"))}
    return {"energy": summarise(rows, "energy_j"), "latency": summarise(rows, "latency_ms"), **parts,
            **forward_parts,
            "forward_note": "eager rows charge the table's gap power over (measured forward latency - predicted "
                            "kernel time); graph rows are pure predictions; forward_latency covers graph rows only"}


def held_out_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace, model: KernelCostModel) -> tuple:
    """The shapes to measure: ``--shape``'s, else ``HELD_OUT_SHAPES`` (none with ``--shapes none``);
    dims the table measured are refused, since they would not be held out. (Ops that read only
    dims a measured shape shares, such as ``rms_norm`` at a swept d_model, are costed from that
    shape's points: their rows say so in ``source``, and ``shape_modelled_*`` leaves them out.)"""
    if args.shape and args.shapes == "none":
        parser.error("--shape and --shapes none contradict each other: give one")
    shapes = tuple(args.shape or (HELD_OUT_SHAPES if args.shapes == "held_out" else ()))
    for dims in shapes:
        if dims == model.dims or any(point_dims(model.table, p) == dims for op in model.ops
                                     for p in model.table["ops"][op]["points"]):
            parser.error(f"--shape {dims}: the table measured ops at this shape, so it is not held out")
    return shapes


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kcm_accuracy", description=__doc__.split("\n\n")[0])
    add_table_flags(parser)
    parser.add_argument("--output", default="kcm_accuracy.json")
    parser.add_argument("--trials", type=positive_int, default=2, help="energy windows per held-out batch point")
    parser.add_argument("--shapes", choices=("held_out", "none"), default="held_out",
                        help="also measure HELD_OUT_SHAPES (one window a point), or not")
    parser.add_argument("--batches", choices=("held_out", "none"), default="held_out",
                        help="measure the held-out batch sizes at the table's dims, or not (shapes only)")
    parser.add_argument("--shape", type=model_dims, action="append", default=None,
                        help="measure these dims instead of HELD_OUT_SHAPES (repeatable), e.g. "
                             "d_model=3072,d_ff=8192,n_heads=24,seq_len=1024,num_experts=16,top_k=2,vocab_size=32000")
    parser.add_argument("--forwards", choices=("measure", "none"), default="measure",
                        help="also measure whole-model forwards (graph and eager), or not (kernels only)")
    args = parser.parse_args(argv)
    args.output = checked_output_file(parser, args.output)
    model = cost_model_from(parser, args)
    shapes = held_out_shapes(parser, args, model)
    if args.batches == "none" and not shapes:
        parser.error("--batches none with no shapes measures nothing")
    if model.is_prior:
        parser.error(f"the {args.gpu} table is a prior: calibrate first (python -m bench.calibrate --gpu {args.gpu})")
    meter = GpuMeter(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    check_gpu(parser, args.gpu, meter)
    idle_power_w = measure_constants(meter)["idle_power_w"]  # after load, as the sweep charges window tails
    uuid = meter.uuid()
    stamp = provenance() | {"driver": meter.driver_version(), "gpu_name": meter.name(), "gpu_uuid": uuid}
    partial = partial_path(args.output)
    rows = kernel_rows(model, meter, idle_power_w, args.trials, shapes, args.batches == "held_out",
                       lambda done: write_json_atomic(partial, {"provenance": stamp, "rows": done}))
    forwards = forward_rows(model, meter, idle_power_w, args.trials) if args.forwards == "measure" else []
    report = {"provenance": stamp,
              "same_board_as_table": uuid == (model.table.get("provenance") or {}).get("gpu_uuid"),
              "table": str(model.path), "table_provenance": model.table.get("provenance"),
              "note": MEASURED_NOISE_NOTE, "idle_power_w": idle_power_w,
              "targets": TARGETS,
              **summaries(rows, forwards), "rows": rows, "forward_rows": forwards}
    write_json_atomic(args.output, report)
    partial.unlink(missing_ok=True)
    for key in ("energy", "latency", "batch_energy", "batch_latency", "shape_energy", "shape_latency",
                "shape_modelled_energy", "shape_modelled_latency", "forward_energy", "forward_latency"):
        if key in report:
            print(f"{key}: median APE {report[key]['median_ape_pct']:.1f}%, p90 {report[key]['p90_ape_pct']:.1f}%, "
                  f"max {report[key]['max_ape_pct']:.1f}%, median signed {report[key]['median_signed_pct']:+.1f}% "
                  f"over {report[key]['n']} held-out points")
    print(f"errors are {MEASURED_NOISE_NOTE}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
