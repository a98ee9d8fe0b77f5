"""``python -m bench.profile_moe``: per-kernel GPU times of one fused-MoE call (torch.profiler).

Shows where the time of ``fused_experts`` goes (routing layout, the two expert GEMMs, the
reduction; with ``--weights fp8`` the FP8 experts' quantizations too) at one shape and token count,
beside ``torch._grouped_mm``'s kernels."""
import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench import moe_cases
from bench._cli import positive_int


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(moe_cases.SHAPES), default="qwen3")
    parser.add_argument("--tokens", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                        help="profile our bf16 experts, or the FP8 experts (as the config picks W8A8 or W8A16)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiling needs a CUDA device; none was found")
    inputs = moe_cases.make_inputs(moe_cases.SHAPES[args.shape], args.tokens, "cuda", torch.bfloat16)
    ours = moe_cases.fp8_calls(*inputs)["fp8"] if args.weights == "fp8" else lambda: moe_cases.ours(*inputs)
    for name, fn in ((f"ours ({args.weights})", ours), ("grouped_mm", lambda: moe_cases.grouped_mm(*inputs))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.repeats):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}: {args.shape} T={args.tokens}, {args.repeats} calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
