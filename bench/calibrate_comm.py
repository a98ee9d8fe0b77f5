"""``torchrun --nproc_per_node N -m bench.calibrate_comm --gpu H100``: the all_to_all cost curve.

Measures ``calibration.collectives.measure_all_to_all`` over the N ranks (NCCL, one process per
GPU; gloo on a machine without CUDA) from 64 KiB to 256 MiB per rank, and on rank 0 merges the
curve into a cost table under ``collectives.all_to_all["N"]``, atomically, keeping every other key
and world size: ``<gpu>.json`` in the user's table folder (``costmodel.table.user_table_dir()``) by
default, or ``--output`` (a new file starts as a copy of the GPU's table as ``find_table`` finds it,
so it is a whole table too). Only a curve whose energies were measured is written: without NVML
(gloo on CPU) the run prints its latencies, says why there is no energy, and writes nothing, so a
table never holds a "measured" curve without measured energy. No GPU setting is changed.
"""
import argparse
import os
import re
import sys
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist

from bench._cli import checked_output_file, positive_int, window_s
from calibration.collectives import measure_all_to_all
from calibration.results import provenance, write_json_atomic
from calibration.sweep import gpu_matches
from costmodel.ops import BYTES_PER_ELEMENT
from costmodel.table import find_table, load_table, user_table_dir

DEFAULT_SIZES = tuple(64 * 2 ** 10 * 4 ** i for i in range(7))  # 64 KiB ... 256 MiB per rank
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
METHOD = ("torch.distributed.all_to_all_single, even splits, bf16 random data. Latency: the slowest rank's median "
          "time (CUDA events) of calls started together after a barrier. Energy: every rank's NVML energy counter "
          "over edge-aligned windows of back-to-back calls (the same count on every rank); the wait before the "
          "barrier and the tail after the work are charged at that GPU's idle power and subtracted; summed over "
          "the GPUs, per call.")


def parse_size(text: str) -> int:
    """Bytes from '65536', '64K', '1M' or '2G' (binary units)."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"a size must be a positive number of bytes such as 65536, 64K or 1M, "
                                         f"got {text!r}")
    return int(match[1]) * UNITS[match[2].upper()]


def parse_args(argv: list | None) -> tuple:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m bench.calibrate_comm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", required=True, help="the cost table to extend, e.g. H100")
    parser.add_argument("--output", default=None, help="the table to write (default: <gpu>.json in the user's table "
                                                        "folder; a new file starts as a copy of the GPU's table)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES),
                        help="bytes each rank sends (64K, 1M, ...), rounded down to a multiple of 2 x world size "
                             "(bf16 split evenly); default 64K to 256M, every factor of 4")
    parser.add_argument("--window_s", type=window_s, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--trials", type=positive_int, default=2, help="windows per size (median and spread)")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed calls per size for the latency")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.gpu):
        parser.error(f"--gpu must be a short name such as H100, got {args.gpu!r}")
    args.output = checked_output_file(parser, args.output or user_table_dir() / f"{args.gpu}.json")
    return parser, args


def world_size_from_torchrun(parser: argparse.ArgumentParser) -> int:
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        parser.error("run under torchrun, one process per GPU: torchrun --nproc_per_node N -m bench.calibrate_comm ...")
    return int(os.environ["WORLD_SIZE"])


def even_sizes(parser: argparse.ArgumentParser, sizes: list, world_size: int) -> list:
    step = BYTES_PER_ELEMENT * world_size
    even = sorted({size - size % step for size in sizes})
    if even[0] == 0:
        parser.error(f"--sizes: every size must be at least {step} bytes (one bf16 element to each of "
                     f"{world_size} ranks)")
    return even


def check_gpu(parser: argparse.ArgumentParser, requested: str) -> None:
    detected = torch.cuda.get_device_name()
    if not gpu_matches(requested, detected):
        parser.error(f"--gpu {requested} does not match the detected GPU {detected!r}")


def init_process_group() -> None:
    """NCCL with this rank's GPU (torchrun's LOCAL_RANK); gloo without CUDA."""
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)


def curve_entry(curve: dict, args: argparse.Namespace) -> dict:
    """The table entry of one world size's measured curve, with its provenance."""
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if curve["backend"] == "nccl" else None
    return {"points": curve["points"], "source": "measured", "provenance": provenance() | {"nccl": nccl},
            "method": METHOD, "backend": curve["backend"], "dtype": "bfloat16", "window_s": args.window_s,
            "trials": args.trials, "repeats": args.repeats, "idle_power_w": curve["idle_power_w"]}


def merge_curve(source: str | Path, output: str | Path, world_size: int, entry: dict, op: str = "all_to_all") -> None:
    """The cost table at ``source`` with ``table["collectives"][op][str(world_size)] = entry``,
    written atomically to ``output`` (the same path or a new one), every other key and world size kept."""
    table, _ = load_table(table=source)
    table.setdefault("collectives", {}).setdefault(op, {})[str(world_size)] = entry
    write_json_atomic(output, table)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _cell(value, width, spec):
    return f"{'-' if value is None else format(value, spec):>{width}}"


def print_curve(curve: dict, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout  # looked up now: redirect_stdout replaces it
    print(f"all_to_all over {curve['world_size']} ranks ({curve['backend']}); energy and power summed over the GPUs",
          file=stream)
    print(f"{'bytes/rank':>12} {'latency ms':>11} {'energy J/call':>14} {'min':>10} {'max':>10} {'power W':>8} "
          f"{'calls/window':>12}", file=stream)
    for p in curve["points"]:
        print(f"{format_bytes(p['bytes_per_rank']):>12} {p['latency_ms']:>11.4f} {_cell(p['energy_j'], 14, '.4e')} "
              f"{_cell(p['energy_j_min'], 10, '.3e')} {_cell(p['energy_j_max'], 10, '.3e')} "
              f"{_cell(p['power_w'], 8, '.0f')} {_cell(p['calls_per_window'], 12, 'd')}", file=stream)


def main(argv: list | None = None) -> int:
    parser, args = parse_args(argv)
    world_size = world_size_from_torchrun(parser)
    output = args.output
    try:
        source = output if output.exists() else find_table(args.gpu)
        load_table(args.gpu, source)  # the table to extend must exist and be for this GPU: fail before measuring
    except ValueError as exc:
        parser.error(f"{exc} (python -m bench.calibrate --gpu {args.gpu} makes a table)")
    if torch.cuda.is_available():
        check_gpu(parser, args.gpu)
    sizes = even_sizes(parser, args.sizes, world_size)
    init_process_group()
    try:
        curve = measure_all_to_all(sizes, window_s=args.window_s, trials=args.trials, repeats=args.repeats)
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    print_curve(curve)
    if curve["energy_missing_reason"] is not None:
        print(f"energy not measured ({curve['energy_missing_reason']}): nothing written to {output}; a cost table "
              "holds measured energies only")
        return 0
    merge_curve(source, output, world_size, curve_entry(curve, args))
    print(f'wrote collectives.all_to_all["{world_size}"] ({len(curve["points"])} sizes) into {output}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
