"""``python -m bench.hpc_single_gpu_test``: dense vs TTT vs energy-aware MoE, measured on one GPU as deployed.

Models (``bench.harness``; our kernels on a GPU, the torch references on a CPU), per ``--preset``
(``bench.harness.presets``): ``transformer`` (dense, at the preset's width), ``transformer_ttt``
(test-time training of the final norm and the last block's FFN), ``moe_energy_aware`` (every router
an ``EnergyAwareTTTRouter``), ``moe_topk`` (the same MoE with plain top-k routing) and ``dense_iso``
(the smallest dense width of the preset's ladder whose checkpoint reaches the MoE's held-out
bits/byte: the iso-quality baseline; absent when that is ``transformer`` itself or nothing was
trained). ``--dense_only`` leaves the MoE models out. Each model runs in ``--mode`` (``graph``, the
default on a GPU: every forward and decode step captured in a CUDA graph over a static KV cache and
replayed, test-time updates replayed as captured graphs between steps; ``eager``: plain Python
calls; ``both``: graph, then eager beside it). What each phase records: ``bench.harness.measure``.

Beside each measurement stands the kernel cost model's *prediction* (the sum of the plan's kernel
costs, no measured latency in it): the table for the GPU when its dims are the model's, else an
analytic prior at the model's dims, labelled with its source. Held-out quality comes from the
checkpoints ``python -m bench.train`` writes; without one a model runs on random weights and its
quality is reported as not measured, by name. Results go to ``--output_dir`` as
``hpc_results.json``, ``kernel_cost_model_test_results.json`` and ``hpc_summary.json`` (atomic
writes), with PNG plots. Without a GPU the same command runs end to end at small sizes (said in the
output) with energy, power and temperature null ("no NVIDIA GPU"). Under ``torchrun
--nproc_per_node N`` each rank benchmarks its own GPU and rank 0 writes one entry per device.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from bench._cli import (MOE_CPU_NEEDS_INTERPRETER, add_preset_flags, checked_output_dir, comma_list, eval_bytes,
                        moe_cpu_without_interpreter, positive_float, positive_int, resolve_device, resolve_preset)
from bench.harness.costs import NO_GPU, known_gpus
from bench.harness.distributed import gather_to_rank0, init_distributed
from bench.harness.hpc_comparison import measure_this_device, model_costs, model_specs
from bench.harness.policies import parse_keep
from bench.harness.report import write_outputs
from calibration.sweep import gpu_matches
from costmodel.kernel_cost_model import KernelCostModel
from router.options import check_objective_weights

CPU_SIZES = {"d_model": 64, "num_layers": 2, "batch_size": 2, "seq_length": 64, "decode": "1,4", "eval_bytes": 2048}
MODE_CHOICES = ("graph", "eager", "both")


# ---- arguments ----------------------------------------------------------------------------------

batch_sizes = comma_list(positive_int, allow_empty=True)


def router_keep(text: str) -> dict:
    """'k2' / 'p0.5' -> {"keep_top_k": .., "keep_share": ..}; 'none' -> {} (every slot re-routable)."""
    if text == "none":
        return {}
    try:
        keep_top_k, keep_share = parse_keep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return {"keep_top_k": keep_top_k, "keep_share": keep_share}


def objective_weights(text: str) -> dict:
    try:
        pairs = dict(item.split("=") for item in text.split(","))
        weights = {key.strip(): float(value) for key, value in pairs.items()}
        return check_objective_weights(weights)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must look like energy=1,latency=0,quality=10 (non-negative, finite, "
                                         f"quality > 0 with a cost weight), got {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.hpc_single_gpu_test", description=__doc__.split("\n\n")[0])
    add_preset_flags(parser)
    parser.add_argument("--batch_size", type=positive_int, help="forward sequences (preset's; 2 on a CPU)")
    parser.add_argument("--mode", choices=MODE_CHOICES, default=None,
                        help="graph (default on a GPU), eager (default on a CPU), or both (graph, eager beside)")
    parser.add_argument("--num_runs", type=positive_int, default=20, help="latency timings per measurement")
    parser.add_argument("--dense_only", action="store_true", help="leave the MoE models out")
    parser.add_argument("--test_moe", action="store_true", help=argparse.SUPPRESS)  # the MoEs run by default now
    parser.add_argument("--ttt_chunk_size", type=positive_int, default=512)
    parser.add_argument("--ttt_update_frequency", type=positive_int, default=128)
    parser.add_argument("--energy_aware_lr", type=positive_float, default=1e-4)
    parser.add_argument("--muon_enabled", action="store_true",
                        help="Muon, not Adam, for the 2-D weights test-time training updates (FFN, router gate)")
    parser.add_argument("--gpu", default="detected",
                        help=f"the GPU whose cost table predicts ({', '.join(known_gpus())}); on a GPU it must be "
                             "the detected one; on a CPU default H100")
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", type=batch_sizes, help="decode batch sizes, comma-separated ('' skips decode); "
                                                           "preset's (1,4,16,64), 1,4 on a CPU")
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where python -m bench.train wrote them")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: each rank its LOCAL_RANK GPU)")
    parser.add_argument("--cost_table", default=None, help="a cost table at one model's dims (e.g. from "
                                                            "python -m bench.calibrate --d_model ... --output PATH)")
    parser.add_argument("--objective_weights", type=objective_weights, default="energy=1,latency=0,quality=1",
                        help="EnergyAwareTTTRouter's weights; a re-route crosses at most 1/quality of probability")
    parser.add_argument("--router_keep", type=router_keep, default="p0.5",
                        help="the energy-aware router's kept experts per token: k<n> or p<share> (the setting "
                             "measured in bench/results/router_policies_H200_deployment), or 'none' to re-route "
                             "every slot")
    parser.add_argument("--energy_trials", type=positive_int, default=3, help="energy windows (>= 1 s) per point")
    parser.add_argument("--eval_bytes", type=eval_bytes, help="held-out bytes (preset's; 2048 on a CPU)")
    return parser


def parse_args(argv: list | None = None, local_rank: int = 0) -> tuple:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device, local_rank)
    on_gpu = args.device.type == "cuda"
    if not args.dense_only and moe_cpu_without_interpreter(args.device):
        parser.error(f"the MoE models: {MOE_CPU_NEEDS_INTERPRETER} (or pass --dense_only)")
    for flag in ("--objective_weights", "--router_keep"):
        if args.dense_only and _given(argv, flag):
            parser.error(f"{flag} sets the energy-aware router: it needs the MoE models (drop --dense_only)")
    args.cpu_sizes = []
    if not on_gpu and args.preset is None:  # small CPU sizes for the dims not given
        args.cpu_sizes = [k for k in ("d_model", "num_layers", "seq_length") if getattr(args, k) is None]
        for key in args.cpu_sizes:
            setattr(args, key, CPU_SIZES[key])
    args.preset = resolve_preset(parser, args)
    preset = args.preset
    for key, value in (("batch_size", preset.batch_size), ("decode", list(preset.decode)),
                       ("eval_bytes", preset.eval_bytes)):
        if getattr(args, key) is None:
            cpu_value = CPU_SIZES[key] if not on_gpu else None
            if cpu_value is not None:
                args.cpu_sizes.append(key)
            value = batch_sizes(cpu_value) if key == "decode" and cpu_value else (cpu_value or value)
            setattr(args, key, value)
    for key in ("d_model", "num_layers", "seq_length", "num_experts", "top_k"):
        setattr(args, key, getattr(preset, key))
    if (args.router_keep.get("keep_top_k") or 0) > args.top_k:
        parser.error(f"--router_keep keeps {args.router_keep['keep_top_k']} experts but top_k is {args.top_k}")
    args.mode = args.mode or ("graph" if on_gpu else "eager")
    if args.mode != "eager" and not on_gpu:
        where = NO_GPU if not torch.cuda.is_available() else "--device cpu"
        parser.error(f"--mode {args.mode}: CUDA graphs need a CUDA device ({where}); use --mode eager")
    args.modes = ["graph", "eager"] if args.mode == "both" else [args.mode]
    args.gpu = resolve_gpu(parser, args.gpu, torch.cuda.get_device_name(args.device) if on_gpu else None)
    args.output_dir = checked_output_dir(parser, args.output_dir)
    check_checkpoint_dir(parser, args.checkpoint_dir)
    if args.cost_table:
        try:
            KernelCostModel(None, table=args.cost_table)
        except (ValueError, TypeError) as exc:
            parser.error(f"--cost_table: {exc}")
    return parser, args


def check_checkpoint_dir(parser: argparse.ArgumentParser, path: str) -> None:
    """A directory, or missing only as the default (a fresh machine runs on random weights)."""
    if Path(path).exists() and not Path(path).is_dir():
        parser.error(f"--checkpoint_dir {path} is not a directory")
    if not Path(path).exists() and path != parser.get_default("checkpoint_dir"):
        parser.error(f"--checkpoint_dir {path} does not exist (python -m bench.train --output_dir {path} writes "
                     "checkpoints there)")


def check_cost_table_dims(parser: argparse.ArgumentParser, cost_table: str | None, specs: list) -> None:
    """``--cost_table`` must be at the dims of one of the compared models."""
    given_dims = KernelCostModel(None, table=cost_table).dims if cost_table else None
    if given_dims is not None and all(s.dims != given_dims for s in specs):
        parser.error(f"--cost_table {cost_table} is at {given_dims}, which is no compared model's dims")


def _given(argv, flag):
    argv = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def resolve_gpu(parser: argparse.ArgumentParser, requested: str, detected_name: str | None) -> str:
    """The table name predictions use: the detected GPU's, or --gpu (which must be the detected one on a GPU)."""
    known = known_gpus()
    if requested not in ("detected", *known):
        parser.error(f"--gpu must be one of {', '.join(known)} (or 'detected'), got {requested!r}")
    if detected_name is None:
        return "H100" if requested == "detected" else requested
    if requested != "detected":
        if not gpu_matches(requested, detected_name):
            parser.error(f"--gpu {requested} does not match the detected GPU {detected_name!r}")
        return requested
    matches = [g for g in known if gpu_matches(g, detected_name)]
    if not matches:
        parser.error(f"--gpu: no cost table or datasheet fits the detected {detected_name!r}; pass --gpu with one "
                     f"of {', '.join(known)} (its predictions are for that GPU) or --cost_table")
    return matches[0]


# ---- main -----------------------------------------------------------------------------------------

def main(argv: list | None = None) -> int:
    parser, args = parse_args(argv, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(args.device)
    specs, selection = model_specs(args)
    check_cost_table_dims(parser, args.cost_table, specs)
    costs = model_costs(args, specs)
    device_entry, current_temp_c = measure_this_device(args, rank, specs, costs)
    devices = gather_to_rank0(device_entry, world)
    if rank == 0:
        write_outputs(args, devices, costs, current_temp_c, selection)
    if world > 1:
        dist.barrier()  # every rank leaves together: a gloo rank exiting while rank 0 writes can abort the group
        dist.destroy_process_group()
    return 0


def exit_without_finalizing(code: int) -> NoReturn:
    """Leave a finished torchrun rank at once: in interpreter finalization gloo's worker threads can
    still release tensors and abort the process (SIGABRT) after every output is written, which
    torchrun then reports as a failed run (pytorch/pytorch PR 179291 describes the race)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalizing(status)
    sys.exit(status)
