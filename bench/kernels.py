"""``python -m bench.kernels``: each dense kernel beside its torch peer.

On a GPU (bf16 by default) every case is checked against the peer, then both are timed in the
same run: per eager call (median of CUDA-event timings after warm-up, L2 flushed between
repeats), as CUDA-graph replays (GPU time alone), and by host enqueue time. Ratios are
peer_time / our_time (> 1 means we are faster). On a
CPU the kernels run under Triton's interpreter at small shapes: the table shows correctness only,
and every time is null with the reason.
"""
import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import triton.testing

from bench import dense_cases
from bench._cli import checked_output_file, write_report
from calibration.results import provenance

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_GPU = "no CUDA device: kernels ran under the Triton interpreter, so times would be meaningless"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def median_ms(fn: Callable[[], object]) -> float:
    """Per-call time (ms) as an eager caller sees it: host launch overhead shows when it exceeds GPU time."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bytes_per_s() -> float:
    """Device-to-device copy bandwidth now (bytes/s), bytes read plus written (1 GiB copied)."""
    src = torch.randn(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def graph_median_ms(fn: Callable[[], object]) -> float:
    """GPU time alone (ms): the call captured in a CUDA graph and replayed (no host overhead)."""
    return triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Median host time (µs) to enqueue one call (the Python + launch overhead a caller pays)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def run_case(case: dense_cases.DenseCase, device: torch.device | str, dtype: torch.dtype, seed: int,
             timed: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = case.make_inputs(device, dtype, gen)
    row = {"case": case.name, "shape": case.shape, "dtype": str(dtype).removeprefix("torch."), "peer": case.peer_name,
           "rel_error_vs_peer": rel_error(case.ours(*inputs), case.peer(*inputs)), "target_ratio": case.target_ratio}
    if not timed:
        return row | {"ours_ms": None, "peer_ms": None, "ratio": None, "graph_ratio": None, "time_null_reason": NO_GPU}
    def ours() -> torch.Tensor:
        return case.ours(*inputs)

    def peer() -> torch.Tensor:
        return case.peer(*inputs)
    ours_ms, peer_ms = median_ms(ours), median_ms(peer)
    ours_graph_ms, peer_graph_ms = graph_median_ms(ours), graph_median_ms(peer)
    ratio, graph_ratio = peer_ms / ours_ms, peer_graph_ms / ours_graph_ms
    return row | {
        "ours_ms": ours_ms, "peer_ms": peer_ms, "ratio": ratio,
        "ours_graph_ms": ours_graph_ms, "peer_graph_ms": peer_graph_ms, "graph_ratio": graph_ratio,
        "ours_host_us": host_us(ours), "peer_host_us": host_us(peer),
        "ours_tflops": case.flops / ours_ms / 1e9, "peer_tflops": case.flops / peer_ms / 1e9,
        "target_met": None if case.target_ratio is None else ratio >= case.target_ratio,
        "target_met_graph": None if case.target_ratio is None else graph_ratio >= case.target_ratio,
    }


def _fmt(value, spec):
    width = int(spec.split(".")[0])
    return "—".rjust(width) if value is None else format(value, spec)


def _verdict(row, key):
    return {True: "met", False: "NOT met", None: "not timed"}[row.get(key)]


def print_table(rows: list) -> None:
    print(f"{'case':52} {'err':>8} {'ours ms':>8} {'peer ms':>8} {'ratio':>6} {'graph':>6} "
          f"{'host us':>11} {'TF/s':>6}  target (eager / graph)")
    for r in rows:
        target = "" if r["target_ratio"] is None else (
            f">={r['target_ratio']} {_verdict(r, 'target_met')} / {_verdict(r, 'target_met_graph')}")
        host = "—" if r.get("ours_host_us") is None else f"{r['ours_host_us']:.0f}/{r['peer_host_us']:.0f}"
        print(f"{r['case']:52} {r['rel_error_vs_peer']:8.1e} {_fmt(r['ours_ms'], '8.4f')} "
              f"{_fmt(r['peer_ms'], '8.4f')} {_fmt(r['ratio'], '6.3f')} {_fmt(r.get('graph_ratio'), '6.3f')} "
              f"{host:>11} {_fmt(r.get('ours_tflops'), '6.1f')}  {target}")
    if rows and rows[0]["ours_ms"] is None:
        print(f"times: null ({NO_GPU})")
    else:
        print("ratio = peer_ms / ours_ms per eager call; graph = the same from CUDA-graph replays (GPU time alone);\n"
              "above 1 we are faster, below 1 the peer is faster. host us = ours/peer enqueue time per call.")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output:
        args.output = checked_output_file(parser, args.output)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if not on_gpu and dtype == torch.bfloat16:
        parser.error("bf16 is broken in the Triton interpreter; use --dtype fp32 or fp16 without a GPU")
    cases = dense_cases.gpu_cases() if on_gpu else dense_cases.cpu_cases()
    cases = [c for c in cases if args.only is None or args.only in c.name]
    rows = [run_case(c, device, dtype, args.seed, timed=on_gpu) for c in cases]
    print_table(rows)
    write_report(args.output, {"provenance": provenance(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
