"""``python -m bench.train``: the harness's byte-level LMs, trained on the Python standard library's source.

Trains, per ``--preset`` (``bench.harness.presets``): ``dense`` (the dense model at the preset's
width), ``moe`` (the MoE the routers run on) and ``iso`` (the rest of the preset's dense width
ladder, from which the benchmark picks the iso-quality dense baseline), each within
``--time_budget_s`` (default: the preset's budget on a GPU, none on a CPU) and ``--steps``. The MoE
trains on ``torch._grouped_mm`` experts (``bench.harness.training``). Checkpoints go to
``--output_dir`` (default ``checkpoints/``, outside git) atomically, named by their dims, with their
config, corpus statistics, held-out bits per byte and perplexity, and provenance.
"""
import argparse
import sys

import torch

from bench._cli import (MOE_CPU_NEEDS_INTERPRETER, add_preset_flags, checked_float, checked_output_dir, comma_list,
                        eval_bytes, moe_cpu_without_interpreter, non_negative_float, positive_float, positive_int,
                        resolve_device, resolve_preset)
from bench.harness.corpus import (checkpoint_path, corpus_files, corpus_summary, evaluate, heldout_streams, read_stream,
                                  save_checkpoint, split_by_file, stdlib_root)
from bench.harness.training import TIMING_STEPS, TrainConfig, train_model
from calibration.results import provenance

MODEL_KINDS = ("dense", "moe", "iso")


def adamw_lr(text: str) -> float:
    return checked_float(text, lambda v: 0 < v <= 1, "a finite AdamW learning rate in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    add_preset_flags(parser)
    parser.add_argument("--steps", type=positive_int, default=None, help="at most this many steps (preset's)")
    parser.add_argument("--time_budget_s", type=positive_float, default=None,
                        help="seconds per model (default: the preset's on a GPU, none on a CPU)")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="training sequences per step")
    parser.add_argument("--lr", type=adamw_lr, default=None, help="peak AdamW learning rate, in (0, 1]")
    parser.add_argument("--aux_loss_coef", type=non_negative_float, default=0.01,
                        help="MoE load-balancing loss weight (>= 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=comma_list(choices=MODEL_KINDS), default="dense,moe,iso",
                        help="comma-separated: dense, moe, iso")
    parser.add_argument("--eval_bytes", type=eval_bytes, default=None,
                        help="held-out bytes to evaluate (default: 131072 on a GPU, 4096 on a CPU)")
    parser.add_argument("--output_dir", default="checkpoints")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def parse_args(argv: list | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preset = resolve_preset(parser, args)
    args.device = resolve_device(parser, args.device)
    if "moe" in args.models and moe_cpu_without_interpreter(args.device):
        parser.error(f"--models moe: {MOE_CPU_NEEDS_INTERPRETER}")
    on_gpu = args.device.type == "cuda"
    if args.eval_bytes is None:
        args.eval_bytes = 131072 if on_gpu else 4096
    if args.time_budget_s is None and on_gpu:
        args.time_budget_s = args.preset.train_seconds
    args.output_dir = checked_output_dir(parser, args.output_dir)
    return args


def jobs(args: argparse.Namespace) -> list:
    """(name, dims, moe) for every model to train."""
    p = args.preset
    out = []
    if "dense" in args.models:
        out.append(("dense", p.dense_dims(), False))
    if "moe" in args.models:
        out.append(("moe", p.moe_dims(), True))
    if "iso" in args.models:
        out += [(f"dense_d{width}", p.dense_dims(width), False) for width in p.dense_ladder[1:]]
    return out


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    p = args.preset
    root = stdlib_root()
    train, heldout = split_by_file(corpus_files(root))
    train_stream = read_stream(root, train)
    if len(train_stream) <= p.seq_length + 1:
        raise SystemExit(f"the training corpus under {root} has only {len(train_stream)} bytes")
    streams = heldout_streams(root, heldout, args.eval_bytes)
    corpus = corpus_summary(root, train, heldout) | {"train_bytes": len(train_stream)}
    print(f"preset {p.name}; corpus: {corpus['train_files']} training files ({len(train_stream) / 1e6:.1f} MB), "
          f"{corpus['heldout_files']} held out (by file); evaluating {sum(len(s) for s in streams)} held-out bytes",
          flush=True)
    config = TrainConfig(max_steps=args.steps or p.train_steps, batch_size=args.batch_size or p.train_batch_size,
                         lr=args.lr or p.lr, time_budget_s=args.time_budget_s, aux_loss_coef=args.aux_loss_coef,
                         seed=args.seed)
    for name, dims, moe in jobs(args):
        model, meta = train_model(dims, p.num_layers, moe, config, train_stream, args.device, name)
        model.eval()
        heldout_metrics = evaluate(model, streams, p.seq_length, args.device)
        path = checkpoint_path(args.output_dir, moe, dims.d_model, p.num_layers, dims.num_experts, dims.top_k,
                               dims.d_ff)
        save_checkpoint(path, model, meta | {"preset": p.name, "corpus": corpus, "heldout": heldout_metrics,
                                             "provenance": provenance()})
        print(f"{name}: held-out {heldout_metrics['bits_per_byte']:.3f} bits/byte (perplexity "
              f"{heldout_metrics['perplexity']:.2f} per byte) over {heldout_metrics['bytes']} bytes, "
              f"{meta['steps']} steps in {meta['train_seconds']:.0f} s; wrote {path}", flush=True)
        if config.time_budget_s is not None and meta["train_seconds"] > config.time_budget_s:
            print(f"note: {name} trained past --time_budget_s {config.time_budget_s:g} s: the schedule is set after "
                  f"timing steps 2-{TIMING_STEPS + 1}, so a budget runs at least min(--steps, {TIMING_STEPS + 2}) "
                  "steps", flush=True)
        del model
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
