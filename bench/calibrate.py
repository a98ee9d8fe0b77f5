"""``python -m bench.calibrate --gpu H100``: measure every op's energy and latency on this GPU.

Sweeps each op the cost model knows (``costmodel.ops.OPS``, run on our kernels in bf16) over
log-spaced batch sizes at the table's dims, then over a few at larger dims (``--shapes``), so the
cost model's tile fit can carry the table to any shape; each point is CUDA-graph replays in
energy windows of at least 1 s on the NVML counter (``calibration.energy``), with CUDA-event
latency. It also measures idle power, the
matmul and copy ceilings, and fits the first-order thermal model to the timeline the sweep itself
heated, and each op's memory-pressure curve (its latency stretch beside a background stream that
takes a set share of HBM bandwidth, ``calibration.pressure``). The table goes to the user's table
folder (``costmodel.table.user_table_dir()``: ``$ENERGY_MOE_TABLES``, else
``~/.cache/energy-moe/tables``), ``<gpu>.json``, which the cost model searches before the packaged
tables, atomically, with its provenance, keeping the collective curves (``bench.calibrate_comm``)
of the table it replaces, and the ops it did not measure (``--ops``) where that table is of the same
GPU and dims (``kept_ops`` names them and their sweep's provenance); a table that fails ``costmodel.table.check_table``
goes to ``<gpu>.rejected.json`` instead, the old table kept, and the run exits non-zero. No GPU
setting is changed.

Every measured point also goes, atomically, to ``<gpu>.partial.json`` beside the output, so an
interrupted sweep continues with ``--resume``: the same settings (refused otherwise, before any
measuring), the points, idle power and ceilings of the earlier runs kept, only the missing points
measured. The thermal model is fitted to the final run's timeline; the table's ``resumed`` says
how many points came from earlier runs. The partial file is removed once the table is written.
The sweep itself is library code, ``calibration.sweep``; this module parses the flags.
"""
import argparse
import json
import re
import sys
from dataclasses import asdict

import torch

from bench._cli import check_gpu, checked_float, checked_output_file, comma_list, positive_int, window_s
from calibration.nvml_meter import GpuMeter
from calibration.sweep import (LATENCY_SHAPES, SHAPE_SWEEP, SweepSettings, new_state, partial_path, rejected_path,
                               run_sweep, sweep_settings)
from costmodel.ops import FP8_OPS, OPS, ModelDims
from costmodel.table import table_names, user_table_dir
from kernels.validate import gpu_has_fp8


def hbm_share(text: str) -> float:
    return checked_float(text, lambda v: 0 < v <= 1, "a share of HBM bandwidth in (0, 1]")


def parse_args(argv: list | None) -> tuple:
    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", required=True, help="the GPU this table is for, e.g. H100 or A100")
    for name, default in asdict(ModelDims()).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--window_s", type=window_s, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--trials", type=positive_int, default=1,
                        help="energy windows per point at the table's dims (2 or more also give a spread; "
                             "each adds ~1.2 s a point)")
    parser.add_argument("--ops", type=comma_list(choices=OPS), default=None,
                        help="comma-separated subset of the ops (default: all; the FP8 ops only on a GPU with FP8); "
                             "the ops of the table at --output that this sweep does not measure are kept")
    parser.add_argument("--pressure_shares", type=comma_list(hbm_share, allow_empty=True), default="0.5,0.9",
                        help="background HBM shares for the memory-pressure curves ('' to skip them)")
    parser.add_argument("--output", default=None, help="default: <gpu>.json in $ENERGY_MOE_TABLES, else "
                                                       "~/.cache/energy-moe/tables")
    parser.add_argument("--trace", default=None, help="also write the sweep's NVML timeline here (for replays)")
    parser.add_argument("--shapes", choices=("default", "none"), default="default",
                        help="also time the ops at calibration.sweep.SHAPE_SWEEP's larger dims (with energy windows) "
                             "and LATENCY_SHAPES' (latency only), which carry the cost model to any shape; "
                             "'none': the table's dims only")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of <output>.partial.json (same settings)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.gpu):
        parser.error(f"--gpu must be a short name such as H100, got {args.gpu!r}")
    known = {name.lower(): name for name in table_names()}.get(args.gpu.lower(), args.gpu)
    if known != args.gpu:
        parser.error(f"--gpu {args.gpu}: the existing table is {known}.json and tables are read by exact "
                     f"name; use --gpu {known}")
    args.ops = checked_ops(parser, args.ops)
    try:
        args.dims = ModelDims(**{k: getattr(args, k) for k in asdict(ModelDims())})
    except ValueError as exc:
        parser.error(str(exc))
    args.output = checked_output_file(parser, args.output or user_table_dir() / f"{args.gpu}.json")
    if args.trace:
        args.trace = checked_output_file(parser, args.trace, "--trace")
    args.settings = SweepSettings(args.gpu, args.dims, tuple(args.ops), args.output, args.window_s, args.trials,
                                  tuple(args.pressure_shares), args.trace,
                                  *((SHAPE_SWEEP, LATENCY_SHAPES) if args.shapes == "default" else ((), ())))
    args.state = resumed_state(parser, args.settings) if args.resume else new_state(args.settings)
    return parser, args


def checked_ops(parser: argparse.ArgumentParser, ops: list | None) -> list:
    """``--ops`` (default: every op this GPU runs); FP8 ops asked of a GPU without FP8 are refused."""
    has_fp8 = gpu_has_fp8()
    if ops is None:
        return [op for op in OPS if has_fp8 or op not in FP8_OPS]
    asked_fp8 = [op for op in ops if op in FP8_OPS]
    if asked_fp8 and torch.cuda.is_available() and not has_fp8:
        parser.error(f"--ops {','.join(asked_fp8)}: this GPU has no FP8 (compute capability below 8.9)")
    return ops


def resumed_state(parser: argparse.ArgumentParser, settings: SweepSettings) -> dict:
    """The interrupted sweep ``--resume`` continues: refused, naming why, when there is none, it is
    unreadable, or it ran with other settings."""
    path = partial_path(settings.output)
    if not path.is_file():
        parser.error(f"--resume: no interrupted sweep at {path}")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        parser.error(f"--resume: {path} is corrupt ({exc}); remove it to start afresh")
    missing = [key for key in new_state(settings) if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(state["settings"], dict):
        parser.error(f"--resume: {path} is not a partial sweep (missing {missing or ['settings']}); remove it to "
                     "start afresh")
    earlier = state["settings"]
    differ = [key for key, value in sweep_settings(settings).items() if earlier.get(key) != value]
    if differ:
        parser.error(f"--resume: {path} is a sweep with other {', '.join(differ)} "
                     f"({', '.join(f'{k}={earlier.get(k)!r}' for k in differ)}); pass the same flags or drop --resume")
    return state


def check_same_board(parser: argparse.ArgumentParser, state: dict, board: "str | None") -> None:
    """Refuse to resume a sweep begun on another board: boards' energy counters differ by about ±5%,
    and one table holds one board's."""
    earlier = [b for b in state.get("boards", []) if b]
    if board and earlier and board not in earlier:
        parser.error(f"--resume: the interrupted sweep ran on board {earlier[-1]}, this GPU is {board}; one table "
                     "holds one board's energy counter (boards differ by about ±5%): calibrate without --resume")


def point_count(table: dict) -> int:
    """The measured points over every op of ``table``."""
    return sum(len(entry["points"]) for entry in table["ops"].values())


def main(argv: list | None = None) -> int:
    parser, args = parse_args(argv)
    meter = GpuMeter(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    detected = check_gpu(parser, args.gpu, meter)
    check_same_board(parser, args.state, meter.uuid())
    partial = partial_path(args.output)
    if not args.resume and partial.exists():
        print(f"note: starting afresh over the interrupted sweep in {partial} (--resume continues it)", file=sys.stderr)
    table, rejected = run_sweep(args.settings, args.state, meter, detected)
    if rejected:
        raise SystemExit(f"the measured table fails its check, so {args.output} is left as it was (the new "
                         f"one is {rejected_path(args.output)}; the points stay in {partial}): {rejected}")
    print(f"wrote {args.output} ({point_count(table)} points, this run {table['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
