"""``python -m bench.hf_router_policies``: the routing policies on a patched Hugging Face Qwen3-MoE.

A transformers ``Qwen3MoeForCausalLM`` (random init) patched with ``kernels.patch_hf_model``, its
gates swapped per policy: plain top-k, ``router.OEARouter`` (default k0 = K/4, K/2) and
``router.EnergyAwareTTTRouter`` frozen (default keep K/4 and share 0.5). Per policy and decode
batch: the decode step's latency and NVML J/token (one CUDA graph over transformers' StaticCache
on a GPU), distinct experts per layer call and moved slots. On a GPU: Qwen3-30B-A3B's layer shape
(vocab 32000), bf16, the router's cost table calibrated here (``--cost_table`` to reuse one). On a
CPU: a tiny model in fp32, eager calls under the Triton interpreter, the analytic prior table,
energy null with the reason. Random weights: no quality is measured. Writes
``hf_router_policies.json`` (atomically) into ``--output_dir`` and prints a table last.
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Qwen3MoeConfig

from bench._cli import checked_output_dir, comma_list, positive_int
from bench.harness import hf_policies
from bench.harness.measure import DeviceEnv, device_header, throttling
from bench.harness.policies import OBJECTIVE_WEIGHTS, parse_keep, policy_grid
from bench.router_policies import cost_model, keep_list
from calibration.results import provenance, write_json_atomic
from costmodel.ops import ModelDims
from router.monitor import HardwareMonitor

RESULTS = "hf_router_policies.json"
GPU_DEFAULTS = {"shape": "qwen3_30b_a3b", "num_layers": 4, "decode": [1, 16, 64], "context": 256, "stat_steps": 8}
CPU_DEFAULTS = {"shape": "tiny", "num_layers": 2, "decode": [1, 4], "context": 8, "stat_steps": 2}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_router_policies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(hf_policies.SHAPES), default=None,
                        help="model shape (qwen3_30b_a3b on a GPU, tiny on a CPU)")
    parser.add_argument("--num_layers", type=positive_int, default=None, help="decoder layers (4 on a GPU, 2 on a CPU)")
    parser.add_argument("--decode", type=comma_list(positive_int), default=None,
                        help="decode batch sizes (1,16,64 on a GPU; 1,4 on a CPU)")
    parser.add_argument("--context", type=positive_int, default=None,
                        help="prompt tokens prefilled per sequence (256 on a GPU, 8 on a CPU)")
    parser.add_argument("--oea_keep", type=keep_list, default=None, help="OEA settings, k<n> each (K/4, K/2)")
    parser.add_argument("--ours_keep", type=keep_list, default=None,
                        help="EnergyAwareTTTRouter settings, k<n> or p<share> each (K/4, p0.5)")
    parser.add_argument("--stat_steps", type=positive_int, default=None,
                        help="eager decode steps for the router statistics (8 on a GPU, 2 on a CPU)")
    parser.add_argument("--energy_trials", type=positive_int, default=2, help="energy windows (>= 1 s) per point")
    parser.add_argument("--cost_table", default=None,
                        help="a table with swiglu_ffn at the expert dims (default: calibrated here on a GPU, "
                             "the analytic prior on a CPU)")
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def default_keeps(top_k: int) -> tuple:
    """(OEA's k0 settings K/4 and K/2, ours K/4 and share 0.5); K itself (plain top-k) left out."""
    quarter, half = max(1, top_k // 4), max(1, top_k // 2)
    return [f"k{k}" for k in dict.fromkeys((quarter, half)) if k < top_k], [f"k{quarter}", "p0.5"]


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    top_k = hf_policies.SHAPES[args.shape]["num_experts_per_tok"]
    oea, ours = default_keeps(top_k)
    args.oea_keep = oea if args.oea_keep is None else args.oea_keep
    args.ours_keep = ours if args.ours_keep is None else args.ours_keep
    try:
        args.policies = policy_grid(args.oea_keep, args.ours_keep, [])
    except ValueError as exc:
        parser.error(str(exc))
    for text in args.oea_keep + args.ours_keep:
        keep_top_k, _ = parse_keep(text)
        if keep_top_k is not None and keep_top_k >= top_k:
            parser.error(f"keep setting {text}: keeping {keep_top_k} of top_k={top_k} experts is plain top-k; "
                         f"give k < {top_k}")
    if args.cost_table is not None and not Path(args.cost_table).is_file():
        parser.error(f"--cost_table {args.cost_table} is not a file")
    args.output_dir = checked_output_dir(parser, args.output_dir)
    return args


def expert_dims(config: Qwen3MoeConfig, context: int) -> ModelDims:
    """The cost table's dims: one expert's SwiGLU FFN at the model's hidden and MoE intermediate sizes."""
    return ModelDims(d_model=config.hidden_size, d_ff=config.moe_intermediate_size, n_heads=config.num_attention_heads,
                     seq_len=context + 1, num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                     vocab_size=config.vocab_size)


def model_entry(args: argparse.Namespace, config: Qwen3MoeConfig, dtype: torch.dtype, patched: int) -> dict:
    return {"class": "transformers.Qwen3MoeForCausalLM (random init)", "shape": args.shape,
            "note": hf_policies.SHAPE_NOTES[args.shape], "config": hf_policies.SHAPES[args.shape],
            "num_hidden_layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": config._attn_implementation, "moe_blocks_patched": patched,
            "patched_with": "kernels.patch_hf_model (FusedMoE, gate = kernels.TopKRouter sharing the HF weights)"}


def decode_entry(args: argparse.Namespace, env: DeviceEnv) -> dict:
    mode = "cuda_graph" if env.on_gpu else "eager"
    return {"mode": mode, "mode_note": "one CUDA graph per policy and batch, replayed" if env.on_gpu else
            "eager calls: no CUDA device, and CUDA graphs need one", "context": args.context,
            "cache": f"transformers StaticCache of {args.context + 1} slots", "batch_sizes": args.decode,
            "stat_steps": args.stat_steps, "method": (
                "a random prompt prefilled eagerly once per batch (plain top-k); every call re-decodes slot "
                f"{args.context} with the next of {hf_policies.ID_POOL_BATCHES} batches of random ids copied into "
                "the static input; latency back to back, energy from the NVML counter over >= 1 s windows; "
                "router statistics from extra eager steps with track_stats routers")}


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    on_gpu = args.device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = hf_policies.qwen3_config(args.shape, args.num_layers)
    model, patched = hf_policies.build_model(config, args.device, dtype, args.seed)
    namespace = SimpleNamespace(cost_table=args.cost_table, device=args.device, output_dir=args.output_dir)
    costs, cost_source = cost_model(namespace, expert_dims(config, args.context))
    env = DeviceEnv(args.device, 0)
    env.start()
    monitor = HardwareMonitor(meter=env.meter).start() if env.metered else None
    try:
        results = hf_policies.run_policies(env, hf_policies.HFGates(model, costs), args.policies, monitor, args)
    finally:
        if monitor is not None:
            monitor.stop()
        env.stop()
    rows = hf_policies.summary_rows(results)
    report = {"provenance": provenance(), "device": device_header(env) | {"throttling": throttling(env)},
              "hf_compat": hf_policies.hf_compat(), "model": model_entry(args, config, dtype, patched),
              "decode": decode_entry(args, env), "cost_table": cost_source,
              "objective_weights": OBJECTIVE_WEIGHTS, "quality": hf_policies.NO_QUALITY,
              "policies": results, "summary": {"rows": rows}}
    write_json_atomic(Path(args.output_dir) / RESULTS, report)
    print(f"mode: {report['decode']['mode']} ({report['decode']['mode_note']}); energy: "
          f"{'NVML' if env.metered else 'null, ' + str(env.energy_reason)}; quality: not measured (random weights)")
    print("\n".join(hf_policies.table_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
