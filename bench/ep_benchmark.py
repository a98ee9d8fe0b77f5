"""``torchrun --nproc_per_node N -m bench.ep_benchmark``: the expert-parallel ``FusedMoE`` on N GPUs.

Each rank holds E/N experts of one MoE layer (default: the Qwen3-30B-A3B shape, 128 experts,
top-8, H 2048, I 768, bf16) and routes its own ``--tokens_per_gpu`` tokens (8192). It measures:

- correctness: the expert-parallel output against the single-GPU layer (all E experts on this
  GPU, same tokens), relative L2 error per rank;
- the single-GPU layer on every GPU at once (the weak-scaling base): tokens/s, J/token, eager
  and replayed from a CUDA graph;
- the expert-parallel layer with plain top-k for each ``--modes`` exchange (``exact``: count
  exchange and one host sync, eager; ``fixed``: ``ep_capacity`` = tokens per GPU, no host sync;
  ``fixed_graph``: the same replayed from a CUDA graph, NCCL collectives inside) at each
  ``--chunks`` (``FusedMoE.ep_chunks``: dispatch of one chunk overlapping the experts of another):
  tokens/s (N*T over the slowest rank's time), J/token (every GPU's NVML energy over the same
  synchronised >= 1 s windows, summed), the bytes each token sends to other GPUs;
- the energy-aware router that charges remote experts the measured all_to_all cost
  (``--cost_table``: a table with an all_to_all curve for N GPUs, from ``python -m
  bench.calibrate_comm``), on the fastest exact exchange (the fixed-size one sends the same bytes
  whatever the routing): its bytes/token and J/token against plain top-k.

Weak-scaling efficiency = EP tokens/s / (N x single-GPU tokens/s), measured in the same run: the
fastest EP configuration against the fastest single-GPU one, and eager against eager, graphs
against graphs.
Latencies are CUDA-event times of back-to-back calls between barriers (median of ``--repeats``
batches, slowest rank). Rank 0 prints a table and writes ``--output`` atomically. On a CPU
(gloo, ``--device cpu``, ``--shape tiny``) it runs end to end with energy null.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from bench._cli import checked_output_file, comma_list, positive_float, positive_int, window_s
from bench.harness.costs import NO_GPU
from bench.harness.distributed import init_distributed
from bench.harness.expert_parallel_run import CPU_SHAPE, results_document, run
from bench.moe_cases import SHAPES
from calibration.priors import DATASHEETS
from calibration.results import write_json_atomic
from costmodel.kernel_cost_model import load_table

MODES = ("exact", "fixed", "fixed_graph")


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m bench.ep_benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3", choices=sorted(SHAPES) + ["tiny"])
    parser.add_argument("--tokens_per_gpu", type=positive_int, default=8192)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed batches of back-to-back calls")
    parser.add_argument("--calls_per_batch", type=positive_int, default=10)
    parser.add_argument("--chunks", type=comma_list(positive_int), default="1,2",
                        help="ep_chunks values to time (comma-separated)")
    parser.add_argument("--modes", type=comma_list(choices=MODES), default=",".join(MODES),
                        help="exchanges to time: exact (count exchange, eager), fixed (ep_capacity = tokens per "
                             "GPU, eager), fixed_graph (the same replayed from a CUDA graph; GPU only)")
    parser.add_argument("--window_s", type=window_s, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--trials", type=positive_int, default=2, help="energy windows per measurement")
    parser.add_argument("--cost_table", default=None,
                        help="table with an all_to_all curve for this GPU count (default: the GPU's table, "
                             "yours before the packaged one)")
    parser.add_argument("--gpu", default="H100", help="the cost table's GPU name")
    parser.add_argument("--quality_weights", type=comma_list(positive_float), default="10,100,1000",
                        help="the energy-aware router's quality weights to run (objective energy=1, latency=0, "
                             "quality=q: a swap moves at most 1/q of probability)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default: ep_results_<N>gpu.json")
    args = parser.parse_args(argv)
    args.on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not args.on_gpu:
        parser.error(f"--device cuda: {NO_GPU}")
    if args.modes == ["fixed_graph"] and not args.on_gpu:
        parser.error("--modes fixed_graph alone measures nothing without a GPU (CUDA graphs)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.shape = CPU_SHAPE if args.shape == "tiny" else SHAPES[args.shape]
    if args.shape.E % world_size:
        parser.error(f"--shape {args.shape.name}: {world_size} ranks do not divide its {args.shape.E} experts")
    check_cost_tables(parser, args, world_size)
    args.output = str(checked_output_file(parser, args.output or f"ep_results_{world_size}gpu.json"))
    if args.shape is not CPU_SHAPE and not args.on_gpu and os.environ.get("RANK", "0") == "0":
        print(f"note: --shape {args.shape.name} without a GPU runs the full layer under the Triton interpreter "
              "(many minutes); --shape tiny is the CPU one", file=sys.stderr)
    return args


def check_cost_tables(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """Load now what the energy-aware run reads: ``--cost_table`` whenever given, and with more than
    one GPU and the exact exchange (the run then charges remote experts) the ``--gpu`` table and datasheet."""
    needed = world_size > 1 and "exact" in args.modes
    if needed and args.gpu not in DATASHEETS:
        parser.error(f"--gpu must be one of {', '.join(DATASHEETS)} (its datasheet gives the router's compute "
                     f"prior), got {args.gpu!r}")
    if args.cost_table or needed:
        try:
            load_table(None if args.cost_table else args.gpu, args.cost_table)
        except ValueError as exc:
            parser.error(f"{'--cost_table' if args.cost_table else '--gpu'}: {exc}")


def print_report(args: argparse.Namespace, world_size: int, results: dict) -> None:
    print(f"expert-parallel FusedMoE, {args.shape.name} (E {args.shape.E}, K {args.shape.K}, H {args.shape.H}, "
          f"I {args.shape.I}), {args.tokens_per_gpu} tokens per GPU, {world_size} GPU(s)")
    correctness = results["correctness"]
    print(f"correctness: max rel L2 error vs the single-GPU layer {correctness['rel_l2_error_max_over_ranks']:.2e} "
          f"(tolerance {correctness['tolerance']:.0e})")
    print(f"{'layer':<26}{'ms/call':>10}{'tokens/s':>14}{'J/token':>12}{'bytes/token out':>18}")
    for name, e in results.items():
        if not (name.startswith("ep_") or name.startswith("single_gpu")):
            continue
        if "skipped" in e:
            print(f"{name:<26}skipped: {e['skipped']}")
            continue
        j = "null" if e["energy_j_per_token"] is None else f"{e['energy_j_per_token']:.3e}"
        b = e.get("bytes_per_token")
        bpt = "" if b is None else f"{b['dispatch'] + b['combine']:.0f}"
        print(f"{name:<26}{e['latency_ms']:>10.3f}{e['tokens_per_s']:>14.0f}{j:>12}{bpt:>18}")
    scaling = results["weak_scaling"]
    print(f"weak-scaling efficiency ({scaling['best_ep']} tokens/s / ({world_size} x {scaling['best_single_gpu']} "
          f"tokens/s)): {scaling['efficiency']:.3f}; eager vs eager {_fmt(scaling['eager_efficiency'])}, "
          f"graphs vs graphs {_fmt(scaling['graph_efficiency'])}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.on_gpu else torch.device("cpu")
    rank, world_size = init_distributed(device, always=True)
    try:
        results = run(args, rank, world_size, device)
        if rank == 0:
            print_report(args, world_size, results)
            write_json_atomic(args.output, results_document(args, world_size, results))
            print(f"wrote {args.output}")
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
