"""``python -m bench.router_energy --output results.json``: the energy-aware router against plain top-k.

On a GPU (bf16), per shape (Mixtral, Qwen3-30B-A3B) it first calibrates one expert's cost (op
``swiglu_ffn`` at the expert dims) into a temporary table with ``bench.calibrate``. Then, per
decode batch size, the same ``FusedMoE`` layer (random weights and data) runs with a plain
``TopKRouter`` and with ``EnergyAwareTTTRouter`` at two settings: "bounded", the smallest
quality (largest shift) whose re-routed fraction stays <= 10% on held-out batches of that size,
and "aggressive" (quality 1). Each row reports: CUDA-graph replay latency (CUDA-event median),
measured energy per token (NVML counter windows >= 1 s, ``calibration.energy``) plus the
test-time updates' measured energy amortised over ``ttt_update_frequency`` tokens, distinct
experts, re-routed fraction, relative L2 deviation of the layer output from plain top-k, and the
routing KL (below); router overhead in us per call against ``TopKRouter`` (both timed as graph
replays). Latency, energy and overhead are timed as deployed, without the router's statistics
(``track_stats=False``); the overhead with them is reported too; zero host syncs, shown by the graph capture
itself and by ``torch.cuda.set_sync_debug_mode("error")`` around an eager call. A ``HardwareMonitor`` samples
NVML at 10 Hz throughout, so the router sees the live temperature and memory pressure.

KL: the router's softmax p is the same for both routers (the bias moves selection only). For a
chosen set S, q_S is p restricted to S and renormalised; KL(q_S || p) = -log p(S) is what the
top-k truncation discards. The row reports its token mean for both routers and the increase.

On a CPU (or with ``--smoke``) it runs tiny shapes under the Triton interpreter with an analytic
prior table (``calibration.priors``): routing figures only, times and energies null with the reason.
"""
import argparse
import sys

import torch

from bench import moe_cases
from bench._cli import checked_output_file, comma_list, positive_int, window_s, write_report
from bench.harness.router_energy import NO_GPU, run_shapes
from calibration.nvml_meter import GpuMeter

GPU_SHAPES = ("mixtral", "qwen3")
GPU_BATCHES = (1, 4, 16, 64, 256)
CPU_BATCHES = (1, 4, 16)


def print_table(rows: list, timed: bool) -> None:
    print(f"{'shape':10} {'T':>4} {'router':10} {'quality':>8} {'rerouted':>8} {'experts':>8} {'relL2':>8} "
          f"{'dKL':>7}" + (f" {'ms':>7} {'mJ/tok':>8} {'d energy':>8} {'ovh us':>7} {'no sync':>7}" if timed else ""))
    for r in rows:
        if r["router"] == "plain" or "skipped" in r:
            if timed and r["router"] == "plain":
                print(f"{r['shape']:10} {r['T']:4d} {'plain':10} {'':>8} {'':>8} {'':>8} {'':>8} {'':>7} "
                      f"{r['latency_ms']:7.3f} {r['energy_j_per_token'] * 1e3:8.3f}")
            elif "skipped" in r:
                print(f"{r['shape']:10} {r['T']:4d} {r['router']:10} skipped: {r['skipped']}")
            continue
        line = (f"{r['shape']:10} {r['T']:4d} {r['router']:10} {r['quality']:8g} {r['rerouted_fraction']:8.1%} "
                f"{r['plain_distinct_experts']:>3}->{r['distinct_experts']:<3} {r['rel_l2_vs_plain']:8.2e} "
                f"{r['kl_increase']:7.3f}")
        if timed:
            line += (f" {r['latency_ms']:7.3f} {r['energy_j_per_token'] * 1e3:8.3f} {r['energy_drop_vs_plain']:8.1%} "
                     f"{r['router_overhead_us']:7.1f} {str(r['sync_free_eager']):>7}")
        print(line)
    if not timed:
        print(f"times and energy: null ({NO_GPU})")
    else:
        print("mJ/tok: measured layer energy + the test-time updates' measured energy amortised per token; "
              "d energy: drop vs plain top-k; ovh: router - TopKRouter forward, graph replays")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_energy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, prior table, no timing (any device)")
    parser.add_argument("--shapes", type=comma_list(), default=None,
                        help=f"comma-separated subset of {','.join(GPU_SHAPES)}")
    parser.add_argument("--batches", type=comma_list(positive_int), default=None,
                        help="comma-separated decode batch sizes")
    parser.add_argument("--window_s", type=window_s, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--trials", type=positive_int, default=2, help="energy windows per point")
    parser.add_argument("--held_out", type=positive_int, default=16, help="batches that pick the bounded quality")
    args = parser.parse_args(argv)
    if args.output:
        args.output = checked_output_file(parser, args.output)
    on_gpu = torch.cuda.is_available()
    timed = on_gpu and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if timed else ("cuda" if on_gpu else "cpu", torch.float32)
    table = moe_cases.SHAPES if timed else moe_cases.CPU_SHAPES
    names = args.shapes or list(GPU_SHAPES if timed else table)
    unknown = set(names) - set(table)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {sorted(table)}")
    batches = args.batches or (GPU_BATCHES if timed else CPU_BATCHES)
    meter = GpuMeter(torch.cuda.current_device()) if timed else None
    if timed and not meter.available:
        parser.error(f"cannot read the GPU's energy: {meter.unavailable_reason}")
    report = run_shapes({name: table[name] for name in names}, batches, device, dtype, meter, args)
    print_table(report["rows"], timed)
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
