"""``python -m bench.fp8_moe``: FP8 experts beside our bf16 experts and ``torch._grouped_mm``: time and energy.

On a GPU with FP8, at the Mixtral and Qwen3-30B-A3B expert shapes, each case first checks the FP8
output against the bf16 path (relative error), then times in the same run, as CUDA-graph replays
(medians): our bf16 path, ``torch._grouped_mm`` (bf16), the FP8 experts as their config picks them,
and FP8 forced weight-only (W8A16) and W8A8. The floor is the touched experts' FP8 weights and
scales over the copy bandwidth measured in this run. Decode rows also get the energy per call (J,
NVML counter, one window of at least ``--window_s`` each) of bf16 and FP8. Ratios are bf16 / FP8
(> 1: FP8 is faster). Without an FP8 GPU nothing is timed and the reason is printed.
"""
import argparse
import sys

import torch

from bench import moe_cases
from bench._cli import checked_output_file, comma_list, write_report
from bench.kernels import copy_bytes_per_s, graph_median_ms, rel_error
from calibration.energy import GraphRunner, measure_energy, measure_idle_power_w
from calibration.nvml_meter import GpuMeter
from calibration.results import provenance
from kernels.quantize import FP8_DTYPE
from kernels.validate import gpu_has_fp8

TOKENS = (1, 4, 16, 1024, 8192)
ENERGY_TOKENS = (1, 16)
SHAPES = ("mixtral", "qwen3")
TARGETS = {  # issue 19's H200 targets: (what, predicate on the row)
    "decode": [("graph <= 0.6x bf16", lambda r: r["fp8_graph_ms"] <= 0.6 * r["bf16_graph_ms"]),
               ("graph <= 1.2x the FP8 floor", lambda r: r["fp8_graph_ms"] <= 1.2 * r["fp8_floor_ms"]),
               ("J/call <= 0.6x bf16", lambda r: r.get("fp8_energy_j") is not None
                and r["fp8_energy_j"] <= 0.6 * r["bf16_energy_j"])],
    ("qwen3", 8192): [(">= 1.3x bf16", lambda r: r["bf16_graph_ms"] >= 1.3 * r["fp8_graph_ms"])],
}


def run_case(shape: moe_cases.MoeShape, T: int, bytes_per_s: float, meter: GpuMeter | None, idle_power_w: float | None,
             window_s: float) -> dict:
    inputs = moe_cases.make_inputs(shape, T, "cuda", torch.bfloat16)
    calls = moe_cases.fp8_calls(*inputs)
    bf16 = moe_cases.ours(*inputs)
    row = {"shape": shape.name, "T": T, "E": shape.E, "K": shape.K, "H": shape.H, "I": shape.I, "mode": calls["mode"],
           "rel_error_vs_bf16": {m: rel_error(calls[m](), bf16) for m in ("fp8", "w8a16", "w8a8")},
           "fp8_floor_ms": moe_cases.floor_ms(shape, inputs[3], FP8_DTYPE, bytes_per_s, scale_bytes=4)[0],
           "bf16_graph_ms": graph_median_ms(lambda: moe_cases.ours(*inputs)),
           "grouped_mm_graph_ms": graph_median_ms(lambda: moe_cases.grouped_mm(*inputs))}
    for mode in ("fp8", "w8a16", "w8a8"):
        row[f"{mode}_graph_ms"] = graph_median_ms(calls[mode])
    row["speedup_vs_bf16"] = row["bf16_graph_ms"] / row["fp8_graph_ms"]
    row["speedup_vs_grouped_mm"] = row["grouped_mm_graph_ms"] / row["fp8_graph_ms"]
    if meter is not None and T in ENERGY_TOKENS:
        for name, fn in (("bf16", lambda: moe_cases.ours(*inputs)), ("fp8", calls["fp8"])):
            row[f"{name}_energy_j"] = measure_energy(meter, GraphRunner(fn).run_for, idle_power_w, window_s,
                                                     trials=1)["energy_j"]
    targets = TARGETS["decode"] if T in (1, 4, 16) else TARGETS.get((shape.name, T), ())
    row["targets"] = {what: bool(met(row)) for what, met in targets
                      if "J/call" not in what or T in ENERGY_TOKENS}
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':8} {'T':>5} {'mode':>6} {'err':>7} {'bf16':>7} {'gmm':>7} {'fp8':>7} {'w8a16':>7} {'w8a8':>7} "
          f"{'floor':>7} {'x bf16':>6} {'J bf16':>9} {'J fp8':>9}  targets")
    for r in rows:
        joules = " ".join(f"{r[k]:9.3e}" if r.get(k) is not None else f"{'-':>9}" for k in ("bf16_energy_j",
                                                                                              "fp8_energy_j"))
        target = "; ".join(f"{what}: {'met' if met else 'NOT met'}" for what, met in r["targets"].items())
        print(f"{r['shape']:8} {r['T']:5d} {r['mode']:>6} {r['rel_error_vs_bf16']['fp8']:7.1e} "
              f"{r['bf16_graph_ms']:7.4f} {r['grouped_mm_graph_ms']:7.4f} {r['fp8_graph_ms']:7.4f} "
              f"{r['w8a16_graph_ms']:7.4f} {r['w8a8_graph_ms']:7.4f} {r['fp8_floor_ms']:7.4f} "
              f"{r['speedup_vs_bf16']:6.2f} {joules}  {target}")
    print("ms: CUDA-graph replay medians; x bf16 = bf16 ms / FP8 ms; J: energy per call (NVML, one window each)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=comma_list(), default=list(SHAPES), help="subset of " + ",".join(SHAPES))
    parser.add_argument("--tokens", type=comma_list(int), default=list(TOKENS), help="token counts")
    parser.add_argument("--window_s", type=float, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--energy", choices=("measure", "none"), default="measure")
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    args = parser.parse_args(argv)
    if args.output:
        args.output = checked_output_file(parser, args.output)
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if not gpu_has_fp8():
        print("nothing timed: the FP8 experts need a CUDA GPU of compute capability >= 8.9")
        return 0
    meter = GpuMeter(torch.cuda.current_device()) if args.energy == "measure" else None
    meter = meter if meter is not None and meter.available else None
    bytes_per_s = copy_bytes_per_s()
    idle_power_w = measure_idle_power_w(meter) if meter is not None else None  # after the copy's load: warm idle
    rows = [run_case(moe_cases.SHAPES[name], T, bytes_per_s, meter, idle_power_w, args.window_s)
            for name in args.shapes for T in args.tokens]
    print_table(rows)
    print(f"measured copy bandwidth: {bytes_per_s / 1e12:.2f} TB/s; idle power {idle_power_w} W")
    write_report(args.output, {"provenance": provenance(), "copy_bytes_per_s": bytes_per_s,
                               "idle_power_w": idle_power_w, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
