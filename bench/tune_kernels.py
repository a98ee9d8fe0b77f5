"""``python -m bench.tune_kernels``: measure block-size candidates and write this GPU's config files.

For each op and shape bucket, every candidate config is timed at a representative shape (median
of CUDA-event timings; a decode bucket's at several row counts, ranked by their geometric mean); the
fastest one that matches torch becomes that bucket's entry in ``kernels/configs/<op>/<GPU_name>.json``,
with all candidates' times and the provenance beside it. Tuned entries apply to 16-bit dtypes; fp32 falls
through to the default entries. Needs a CUDA device. Runtime lookups then read the file; nothing autotunes
at call time.
"""
import argparse
import math
import sys

import torch

from bench.harness.tuning import time_candidates, write_tuned
from kernels.attention import launch_flash_attention
from kernels.matmul import launch_matmul

# pointer kernel; TMA; persistent TMA; persistent TMA with warp-specialised loads
VARIANTS = [{}, {"tma": True}, {"tma": True, "persistent": True},
            {"tma": True, "persistent": True, "warp_specialize": True}]
ATTENTION_VARIANTS = [{}, {"tma": True}, {"tma": True, "warp_specialize": True}]
DECODE_GEMMS = [(16, 64, 256, 4, 3), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4)]
# a decode GEMM of N <= 2048 on 64-column tiles runs N / 64 programs: 32 of the H100's 132 SMs at N = 2048
# (ffn_down of 2048 x 5632 at one token: 16.5 us, 23 MB at 1.4 TB/s, in the 2026-12-07 H100 table)
NARROW_DECODE_GEMMS = [(16, 16, 256, 2, 3), (16, 16, 128, 2, 4), (16, 32, 256, 4, 3), (16, 32, 128, 4, 4)]
# 17-64 rows get their own buckets: the 16-row tile one bucket gave them re-reads the weight once per 16 rows
# (2026-12-07 H100 table, qkv_projection at d_model 7168: 125 us at one token, 173 us at 64, 168 us at 256)
WIDE_DECODE_GEMMS = [(32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4),
                     (32, 128, 128, 4, 4), (64, 128, 128, 8, 3)]
PREFILL_GEMMS = [(256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                 (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]


def gemm_candidates(tiles: list, variants: list) -> list:
    return [dict(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=w, num_stages=s) | v
            for bm, bn, bk, w, s in tiles for v in variants]


DECODE = gemm_candidates(DECODE_GEMMS, VARIANTS[:2])
NARROW_DECODE = gemm_candidates(NARROW_DECODE_GEMMS + DECODE_GEMMS[:2], VARIANTS[:2])
WIDE_DECODE = gemm_candidates(WIDE_DECODE_GEMMS + DECODE_GEMMS[:1], VARIANTS[:2])
WIDE_NARROW_DECODE = gemm_candidates(WIDE_DECODE_GEMMS[:3] + NARROW_DECODE_GEMMS[2:] + DECODE_GEMMS[:1], VARIANTS[:2])
PREFILL = gemm_candidates(PREFILL_GEMMS, VARIANTS)
ATTENTION_CANDIDATES = [
    dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s) | v
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                         (64, 128, 4, 3)]
    for v in ATTENTION_VARIANTS
]
# (when, representative shape, candidates): buckets in lookup order, the last one unconditional; each shape
# must fall in its own bucket (a test checks), or its tuned entry serves shapes it was never timed at
GEMM_BUCKETS = {  # shapes are (M, N, K)
    "matmul": [({"max_m": 16, "max_n": 2048}, (16, 2048, 5632), NARROW_DECODE),
               ({"max_m": 16}, (16, 4096, 4096), DECODE),
               ({"max_m": 64, "max_n": 2048}, (64, 2048, 5632), WIDE_NARROW_DECODE),
               ({"max_m": 64}, (64, 4096, 4096), WIDE_DECODE), ({"max_n": 1024}, (4096, 256, 1024), PREFILL),
               ({"max_k": 1024}, (4096, 4096, 1024), PREFILL), ({}, (4096, 4096, 14336), PREFILL)],
    "swiglu_gate_up": [({"max_m": 16}, (16, 14336, 4096), DECODE), ({"max_m": 64}, (64, 5632, 2048), WIDE_DECODE),
                       ({"max_k": 1024}, (4096, 1024, 256), PREFILL), ({}, (4096, 14336, 4096), PREFILL)],
}
ATTENTION_BUCKETS = [  # shapes are (B, H, S, D), causal
    ({"max_head_dim": 32}, (8, 8, 512, 32), ATTENTION_CANDIDATES),
    ({"max_head_dim": 64}, (4, 16, 4096, 64), ATTENTION_CANDIDATES),
    ({}, (8, 32, 2048, 128), ATTENTION_CANDIDATES),
]
TUNED_OPS = (*GEMM_BUCKETS, "attention")
# a decode bucket's candidates are timed at several row counts and ranked by the geometric mean: timed at 16
# rows alone, a 16 x 16 x 256 tile won the narrow bucket (21.5 us against 16 x 64's) and then ran ffn_down
# 2048 x 5632 at 1-4 tokens in 36-52 us against 23-24 us (bench/results/decode_tuning_H100_2026-12-07f/)
DECODE_ROWS = {16: (1, 4, 16), 64: (24, 64)}


def timed_rows(when: dict, shape: tuple) -> tuple:
    """The row counts a bucket's candidates are timed at: ``DECODE_ROWS`` for a decode bucket, else its shape's."""
    return DECODE_ROWS.get(when.get("max_m"), (shape[0],))


def _gemm_bucket(op, when, shape, candidates, dtype, gen):
    """Each candidate's geometric mean over ``timed_rows`` of its median time (failed at any: failed)."""
    _, N, K = shape
    w = (torch.randn(2 * N if op == "swiglu_gate_up" else N, K, device="cuda", generator=gen) / math.sqrt(K)).to(dtype)
    per_rows = [_gemm_times(op, torch.randn(M, K, device="cuda", generator=gen).to(dtype), w, candidates)
                for M in timed_rows(when, shape)]
    results = []
    for timings in zip(*per_rows):
        errors = [error for ms, error, _ in timings if ms is None]
        mean_ms = None if errors else math.exp(sum(math.log(ms) for ms, _, _ in timings) / len(timings))
        results.append((mean_ms, errors[0] if errors else None, timings[0][2]))
    return results


def _gemm_times(op, x, w, candidates):
    fuse = op == "swiglu_gate_up"

    def reference() -> torch.Tensor:
        if fuse:
            gate, up = (x @ w.T).chunk(2, dim=-1)
            return torch.nn.functional.silu(gate.float()) * up.float()
        return x @ w.T
    return time_candidates(candidates, lambda cfg: launch_matmul(x, w, fuse_swiglu=fuse, cfg=cfg), reference)


def _attention_bucket(shape, candidates, dtype, gen):
    B, H, S, D = shape
    q, k, v = (torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype) for _ in range(3))
    scale = D ** -0.5
    return time_candidates(
        candidates, lambda cfg: launch_flash_attention(q, k, v, True, scale, cfg),
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def _entries(buckets, timed):
    entries, measured = [], []
    for (when, shape, _), results in zip(buckets, timed):
        ok = [r for r in results if r[0] is not None]
        if not ok:
            raise RuntimeError(f"no candidate config worked at {shape}")
        best_ms, _, best = min(ok, key=lambda r: r[0])
        entries.append({"when": when | {"max_elem_bytes": 2}, "config": best})
        rows = {"timed_rows": timed_rows(when, shape)} if "max_m" in when else {}
        measured.append({"shape": shape, **rows, "best_ms": best_ms,
                         "candidates": [{"config": c, "median_ms": ms, "error": e} for ms, e, c in results]})
    return entries, measured


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--ops", default=",".join(TUNED_OPS),
                        help=f"comma-separated subset of {','.join(TUNED_OPS)} (the others' files stay as they are)")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(TUNED_OPS))
    if unknown or not ops or len(set(ops)) < len(ops):
        parser.error(f"--ops: want distinct ops from {', '.join(TUNED_OPS)}; got {args.ops!r}")
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA device; none was found")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu = torch.cuda.get_device_name()
    buckets = GEMM_BUCKETS | {"attention": ATTENTION_BUCKETS}
    plan = {op: [_attention_bucket(shape, cands, dtype, gen) if op == "attention" else
                 _gemm_bucket(op, when, shape, cands, dtype, gen) for when, shape, cands in buckets[op]] for op in ops}
    for op, timed in plan.items():
        entries, measured = _entries(buckets[op], timed)
        print(f"{op}: " + "; ".join(f"{m['shape']} {m['best_ms']:.4f} ms {e['config']}"
                                    for m, e in zip(measured, entries)))
        write_tuned(op, gpu, entries, measured, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
