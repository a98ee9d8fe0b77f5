"""``python -m bench.kernels``: each dense kernel beside its torch peer.

On a GPU (bf16 by default) every case is checked against the peer, then both are timed in the
same run (median of CUDA-event timings after warm-up, L2 flushed between repeats) and the table
gives our time, the peer's, and the ratio peer_time / our_time (> 1 means we are faster). On a
CPU the kernels run under Triton's interpreter at small shapes: the table shows correctness only,
and every time is null with the reason.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: @triton.jit reads it

from bench import dense_cases  # noqa: E402
from bench._results import provenance, write_json_atomic  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_GPU = "no CUDA device: kernels ran under the Triton interpreter, so times would be meaningless"


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def median_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def run_case(case, device, dtype, seed, timed):
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = case.make_inputs(device, dtype, gen)
    row = {"case": case.name, "shape": case.shape, "dtype": str(dtype).removeprefix("torch."), "peer": case.peer_name,
           "rel_error_vs_peer": rel_error(case.ours(*inputs), case.peer(*inputs)), "target_ratio": case.target_ratio}
    if not timed:
        return row | {"ours_ms": None, "peer_ms": None, "ratio": None, "time_null_reason": NO_GPU}
    ours_ms, peer_ms = median_ms(lambda: case.ours(*inputs)), median_ms(lambda: case.peer(*inputs))
    ratio = peer_ms / ours_ms
    return row | {
        "ours_ms": ours_ms, "peer_ms": peer_ms,
        "ours_tflops": case.flops / ours_ms / 1e9, "peer_tflops": case.flops / peer_ms / 1e9,
        "ratio": ratio, "target_met": None if case.target_ratio is None else ratio >= case.target_ratio,
    }


def _fmt(value, spec):
    width = int(spec.split(".")[0])
    return "—".rjust(width) if value is None else format(value, spec)


def print_table(rows):
    print(f"{'case':52} {'err vs peer':>11} {'ours ms':>9} {'peer ms':>9} {'ours TF/s':>9} {'ratio':>6}  target")
    for r in rows:
        target = "" if r["target_ratio"] is None else (
            f">={r['target_ratio']} " + {True: "met", False: "NOT met", None: "not timed"}[r.get("target_met")])
        print(f"{r['case']:52} {r['rel_error_vs_peer']:11.2e} {_fmt(r['ours_ms'], '9.4f')} "
              f"{_fmt(r['peer_ms'], '9.4f')} {_fmt(r.get('ours_tflops'), '9.1f')} {_fmt(r['ratio'], '6.3f')}  {target}")
    if rows and rows[0]["ours_ms"] is None:
        print(f"times: null ({NO_GPU})")
    else:
        print("ratio = peer_ms / ours_ms: above 1 we are faster, below 1 the peer is faster")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if not on_gpu and dtype == torch.bfloat16:
        parser.error("bf16 is broken in the Triton interpreter; use --dtype fp32 or fp16 without a GPU")
    cases = dense_cases.gpu_cases() if on_gpu else dense_cases.cpu_cases()
    cases = [c for c in cases if args.only is None or args.only in c.name]
    rows = [run_case(c, device, dtype, args.seed, timed=on_gpu) for c in cases]
    print_table(rows)
    if args.output:
        write_json_atomic(args.output, {"provenance": provenance(), "rows": rows})
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
