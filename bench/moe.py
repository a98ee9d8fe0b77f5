"""``python -m bench.moe``: the fused MoE experts beside the HF per-expert loop and ``torch._grouped_mm``.

On a GPU (bf16) each case is checked against the loop, then all three are timed in the same
run: per eager call (median of CUDA-event timings, L2 flushed between repeats) and as CUDA-graph
replays. Ratios are peer_time / our_time (> 1 means we are faster). Decode rows also give the
memory floor: the touched experts' weight bytes over the copy bandwidth measured in the same
run. On a CPU the kernels run under Triton's interpreter at tiny shapes: correctness only,
times null with the reason.
"""
import argparse
import sys

import torch

from bench import moe_cases
from bench._cli import checked_output_file, comma_list, write_report
from bench.kernels import NO_GPU, copy_bytes_per_s, graph_median_ms, median_ms, rel_error
from calibration.results import provenance

PEERS = {"grouped_mm": moe_cases.grouped_mm, "hf_loop": moe_cases.hf_loop}
TARGETS = {  # (shape, T) -> [(what, predicate on the row)], issue 17's H200 targets
    ("mixtral", 1): [("graph <= 1.15x the weight-read floor", lambda r: r["ours_graph_ms"] <= 1.15 * r["floor_ms"])],
    ("mixtral", 1024): [(">= 1.1x grouped_mm", lambda r: r["ratio_grouped_mm"] >= 1.1)],
    ("qwen3", 1): [("eager <= 0.15 ms", lambda r: r["ours_ms"] <= 0.15),
                   ("graph <= 2.0x the weight-read floor", lambda r: r["ours_graph_ms"] <= 2.0 * r["floor_ms"])],
    ("qwen3", 8192): [(">= 2.0x grouped_mm", lambda r: r["ratio_grouped_mm"] >= 2.0)],
} | {("mixtral", T): [(">= 600 TFLOP/s", lambda r: r["ours_tflops"] >= 600),
                      (">= 1.15x grouped_mm", lambda r: r["ratio_grouped_mm"] >= 1.15)] for T in (4096, 16384)}


def run_case(shape: moe_cases.MoeShape, T: int, device: torch.device | str, dtype: torch.dtype, timed: bool,
             bytes_per_s: float | None = None) -> dict:
    inputs = moe_cases.make_inputs(shape, T, device, dtype)
    out = moe_cases.ours(*inputs)
    row = {"shape": shape.name, "T": T, "E": shape.E, "K": shape.K, "H": shape.H, "I": shape.I,
           "dtype": str(dtype).removeprefix("torch."),
           "rel_error_vs_hf_loop": rel_error(out, moe_cases.hf_loop(*inputs))}
    if not timed:
        return row | {"ours_ms": None, "time_null_reason": NO_GPU}
    floor, distinct = moe_cases.floor_ms(shape, inputs[3], dtype, bytes_per_s)
    row |= {"distinct_experts": distinct, "floor_ms": floor}
    row["ours_ms"], row["ours_graph_ms"] = median_ms(lambda: moe_cases.ours(*inputs)), \
        graph_median_ms(lambda: moe_cases.ours(*inputs))
    row["ours_tflops"] = moe_cases.flops(shape, T) / row["ours_ms"] / 1e9
    for name, peer in PEERS.items():
        row[f"{name}_ms"] = median_ms(lambda: peer(*inputs))
        row[f"ratio_{name}"] = row[f"{name}_ms"] / row["ours_ms"]
    row["grouped_mm_graph_ms"] = graph_median_ms(lambda: moe_cases.grouped_mm(*inputs))
    row["graph_ratio_grouped_mm"] = row["grouped_mm_graph_ms"] / row["ours_graph_ms"]
    row["never_slower_than_grouped_mm"] = row["ratio_grouped_mm"] >= 1.0
    row["targets"] = {what: bool(met(row)) for what, met in TARGETS.get((shape.name, T), ())}
    return row


def print_table(rows: list[dict]) -> None:
    if rows[0]["ours_ms"] is None:
        for r in rows:
            print(f"{r['shape']:12} T={r['T']:<6} rel. error vs HF loop {r['rel_error_vs_hf_loop']:.2e}")
        print(f"times: null ({NO_GPU})")
        return
    print(f"{'shape':8} {'T':>6} {'err':>8} {'ours ms':>8} {'graph':>8} {'gmm ms':>8} {'x gmm':>6} {'x gmm(g)':>8} "
          f"{'loop ms':>8} {'x loop':>6} {'TF/s':>6} {'floor':>7}  target")
    for r in rows:
        target = "; ".join(f"{what}: {'met' if met else 'NOT met'}" for what, met in r["targets"].items())
        print(f"{r['shape']:8} {r['T']:6d} {r['rel_error_vs_hf_loop']:8.1e} {r['ours_ms']:8.3f} {r['ours_graph_ms']:8.3f} "
              f"{r['grouped_mm_ms']:8.3f} {r['ratio_grouped_mm']:6.2f} {r['graph_ratio_grouped_mm']:8.2f} "
              f"{r['hf_loop_ms']:8.3f} {r['ratio_hf_loop']:6.2f} {r['ours_tflops']:6.0f} {r['floor_ms']:7.3f}  {target}")
    print("x gmm / x loop = peer_ms / ours_ms per eager call; x gmm(g) from CUDA-graph replays; "
          "above 1 we are faster. floor = touched experts' weight bytes / measured copy bandwidth.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=comma_list(), default=None,
                        help="comma-separated subset of " + ",".join(moe_cases.SHAPES))
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    args = parser.parse_args(argv)
    if args.output:
        args.output = checked_output_file(parser, args.output)
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    shapes = moe_cases.SHAPES if on_gpu else moe_cases.CPU_SHAPES
    names = args.shapes or list(shapes)
    unknown = set(names) - set(shapes)
    if unknown:
        parser.error(f"--shapes: unknown shapes {sorted(unknown)}; choose from {sorted(shapes)}")
    bytes_per_s = copy_bytes_per_s() if on_gpu else None
    rows = [run_case(shapes[n], T, device, dtype, on_gpu, bytes_per_s)
            for n in names for T in (moe_cases.GPU_TOKENS[n] if on_gpu else moe_cases.CPU_TOKENS)]
    print_table(rows)
    if bytes_per_s:
        print(f"measured copy bandwidth: {bytes_per_s / 1e12:.2f} TB/s")
    write_report(args.output, {"provenance": provenance(), "copy_bytes_per_s": bytes_per_s, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
