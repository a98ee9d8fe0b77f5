"""``python -m bench.router_policies``: routing policies on a trained harness MoE, as deployed.

Plain top-k, Opportunistic Expert Activation (``router.OEARouter``) at several k0, and
``EnergyAwareTTTRouter``'s baseline-preserving policy at several keep settings (plus one with
test-time training on), all on the same trained MoE (``python -m bench.train --models moe``
writes it into ``--checkpoint_dir``): held-out bits/byte, J/token of the whole decode step and of
the MoE layers alone, distinct experts and moved slots, at every decode batch (CUDA graphs over a
static KV cache on a GPU) and in the forward. What each figure is: ``bench.harness.policies``;
the targets and the plot: ``bench.harness.policy_report``.

The energy-aware router's cost table is one expert's ``swiglu_ffn`` at the MoE's expert dims:
calibrated on this GPU at the start of the run (``bench.calibrate``; the table is written beside
the results), or ``--cost_table``. Without a GPU the same command runs end to end at small sizes
under the Triton interpreter, on the analytic prior table (labelled so), with energy null and
the reason. Writes ``router_policies.json`` (atomically) and ``router_policies.png`` into
``--output_dir``, and prints the comparison table last.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from bench._cli import add_preset_flags, checked_output_dir, comma_list, eval_bytes, positive_int, resolve_preset
from bench.harness.corpus import corpus_files, heldout_streams, split_by_file, stdlib_root
from bench.harness.measure import DeviceEnv, ModelSpec, device_header, load_weights, throttling
from bench.harness.models import TransformerLM
from bench.harness.policies import PolicyModel, default_keeps, parse_keep, policy_grid
from bench.harness.policy_report import (TARGET_BATCH, hot_check, plot_energy_vs_quality, run_policies, summarize,
                                         sync_free_routers, table_lines)
from bench.harness.router_energy import short_gpu_name
from calibration.priors import prior_table
from calibration.results import provenance, write_json_atomic
from calibration.sweep import calibrate_ops
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from router.monitor import HardwareMonitor

CPU_SIZES = {"d_model": 64, "num_layers": 2, "num_experts": 8, "top_k": 4, "expert_d_ff": 64, "seq_length": 32}
RESULTS = "router_policies.json"
PARTIAL = "router_policies.partial.json"  # the decode batches measured so far; removed once RESULTS is written


def keep_list(text: str) -> list:
    items = comma_list(allow_empty=True)(text)
    for item in items:
        try:
            parse_keep(item)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.router_policies", description=__doc__.split("\n\n")[0])
    add_preset_flags(parser)
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where python -m bench.train wrote the MoE")
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--decode", type=comma_list(positive_int), default=None,
                        help="decode batch sizes (the preset's; 1,4 on a CPU)")
    parser.add_argument("--oea_keep", type=keep_list, default=None, help="OEA settings, k<n> each (K/4, K/2, 3K/4)")
    parser.add_argument("--ours_keep", type=keep_list, default=None,
                        help="our settings, k<n> or p<share> each (K/4, K/2, p0.5, p0.7)")
    parser.add_argument("--ttt_keep", type=keep_list, default=None,
                        help="our settings re-run with test-time training on ('' for none; default K/2)")
    parser.add_argument("--context", type=positive_int, default=None, help="prefilled bytes per stream (seq/4)")
    parser.add_argument("--decode_steps", type=positive_int, default=None,
                        help="teacher-forced steps per round (seq/4)")
    parser.add_argument("--decode_bytes", type=eval_bytes, default=None,
                        help="held-out predictions per decode batch (a quarter at B=1); 8192, 64 on a CPU")
    parser.add_argument("--forward_eval_bytes", type=eval_bytes, default=None,
                        help="held-out bytes of the full-context evaluation (32768; 256 on a CPU)")
    parser.add_argument("--energy_trials", type=positive_int, default=2,
                        help="energy windows (>= 1 s) per point; at decode, passes over the policies, every other "
                             "one in reverse order")
    parser.add_argument("--ttt_update_frequency", type=positive_int, default=128)
    parser.add_argument("--ttt_chunk_size", type=positive_int, default=512)
    parser.add_argument("--energy_aware_lr", type=float, default=1e-4)
    parser.add_argument("--cost_table", default=None, help="a table with swiglu_ffn at the expert dims "
                                                            "(default: calibrated here on a GPU, the prior on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list | None = None) -> tuple:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = args.device.type == "cuda"
    args.cpu_sizes = []
    if not on_gpu and args.preset is None:
        args.cpu_sizes = [k for k in CPU_SIZES if getattr(args, k) is None]
        for key in args.cpu_sizes:
            setattr(args, key, CPU_SIZES[key])
    args.preset = resolve_preset(parser, args)
    p = args.preset
    if p.top_k < 2:
        parser.error(f"re-routing needs top_k >= 2 (a kept expert and a slot to fill), got {p.top_k}")
    oea, ours = default_keeps(p.top_k)
    args.oea_keep = oea if args.oea_keep is None else args.oea_keep
    args.ours_keep = ours if args.ours_keep is None else args.ours_keep
    args.ttt_keep = ours[1:2] if args.ttt_keep is None else args.ttt_keep
    try:
        args.policies = policy_grid(args.oea_keep, args.ours_keep, args.ttt_keep)
    except ValueError as exc:
        parser.error(str(exc))
    for policy in args.policies:
        if policy.keep_top_k is not None and policy.keep_top_k > p.top_k:
            parser.error(f"{policy.name}: keeps {policy.keep_top_k} experts but top_k is {p.top_k}")
    args.decode = args.decode or ([1, 4] if not on_gpu else list(p.decode))
    args.context = args.context or max(1, p.seq_length // 4)
    args.decode_steps = args.decode_steps or max(1, p.seq_length // 4)
    if args.context + args.decode_steps + 4 > p.seq_length:
        parser.error(f"--context + --decode_steps ({args.context} + {args.decode_steps}) must leave room in the "
                     f"{p.seq_length}-position cache")
    args.decode_bytes = args.decode_bytes or (8192 if on_gpu else 64)
    args.forward_eval_bytes = args.forward_eval_bytes or (32768 if on_gpu else 256)
    args.seq_length, args.batch_size = p.seq_length, (p.batch_size if on_gpu else 2)
    args.output_dir = checked_output_dir(parser, args.output_dir)
    return parser, args


def cost_model(args: argparse.Namespace | SimpleNamespace, dims: ModelDims) -> tuple:
    """(KernelCostModel with swiglu_ffn at the expert dims, where it came from)."""
    if args.cost_table:
        return KernelCostModel(None, table=args.cost_table), {"source": args.cost_table}
    if args.device.type != "cuda":
        path = Path(args.output_dir) / "prior_swiglu_ffn.json"
        write_json_atomic(path, prior_table("H100", dims))
        return KernelCostModel("H100", table=path), {"source": "analytic prior (no GPU to calibrate on): a prior, "
                                                               "not a measurement", "path": str(path)}
    gpu = short_gpu_name(torch.cuda.get_device_name())
    path = Path(args.output_dir) / f"{gpu}_swiglu_ffn_d{dims.d_model}_f{dims.d_ff}.json"
    calibrate_ops(gpu, ("swiglu_ffn",), dims, path)
    return KernelCostModel(gpu, table=path), {"source": f"calibrated in this run on this GPU ({path.name})",
                                              "path": str(path)}


def build_lm(args: argparse.Namespace) -> tuple:
    p = args.preset
    on_gpu = args.device.type == "cuda"
    lm = TransformerLM(p.moe_dims(), p.num_layers, moe=True, use_kernels=on_gpu, device=args.device,
                       dtype=torch.bfloat16 if on_gpu else torch.float32, seed=args.seed).eval()
    return lm, load_weights(lm, ModelSpec("moe_topk", p.moe_dims(), p.num_layers), args.checkpoint_dir)


def main(argv: list | None = None) -> int:
    parser, args = parse_args(argv)
    p = args.preset
    root = stdlib_root()
    _, heldout = split_by_file(corpus_files(root))
    text = torch.cat(heldout_streams(root, heldout, max(args.decode_bytes * 2, 1 << 16)))
    forward_streams = heldout_streams(root, heldout, args.forward_eval_bytes)
    env = DeviceEnv(args.device, 0)
    lm, checkpoint = build_lm(args)
    costs, cost_source = cost_model(args, p.moe_dims())
    env.start()
    monitor = HardwareMonitor(meter=env.meter).start() if env.metered else None
    model = PolicyModel(lm, costs, {"update_frequency": args.ttt_update_frequency,
                                    "chunk_size": args.ttt_chunk_size, "lr": args.energy_aware_lr})
    try:
        partial = Path(args.output_dir) / PARTIAL
        results = run_policies(env, model, args.policies, monitor, text, forward_streams, args,
                               save_partial=lambda out: write_json_atomic(partial, {"policies": out}))
        target = next((q for q in args.policies if q.kind == "ours" and not q.adapt), None)
        hot = hot_check(env, model, target, monitor, text, args) if target and TARGET_BATCH in args.decode else None
        syncs = sync_free_routers(model, args.policies, monitor, args.device)
    finally:
        if monitor is not None:
            monitor.stop()
        env.stop()
    summary = summarize(results, hot, p.num_layers)
    report = {"provenance": provenance(), "device": device_header(env) | {"throttling": throttling(env)},
              "preset": replace(p, decode=tuple(args.decode)).as_dict(), "cpu_sizes": args.cpu_sizes,
              "checkpoint": checkpoint, "cost_table": cost_source, "context": args.context,
              "decode_steps": args.decode_steps, "policies": results, "hot_state": hot, "host_syncs": syncs,
              "summary": summary}
    report["plot"] = plot_energy_vs_quality(results, Path(args.output_dir) / "router_policies.png")
    write_json_atomic(Path(args.output_dir) / RESULTS, report)
    partial.unlink(missing_ok=True)
    if not checkpoint["loaded"]:
        print(f"note: {checkpoint['reason']}: bits/byte are of random weights", flush=True)
    print("\n".join(table_lines(summary["rows"])))
    print("\n".join(verdict_lines(summary["targets"])))
    return 0


def verdict_lines(targets: dict) -> list:
    """One line per target (met or not), and per test-time-training setting whether it pays."""
    lines = [f"{name}: met={verdict['met']}" for name, verdict in targets.items() if "met" in verdict]
    ttt = targets.get("test_time_training", {})
    lines += [f"test_time_training {name}: pays={v['pays']}" for name, v in ttt.items() if isinstance(v, dict)]
    return lines or ["no target was evaluated"]


if __name__ == "__main__":
    sys.exit(main())
