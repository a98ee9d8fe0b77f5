"""Prefill: fused experts with weight tiles by TMA (and warp specialization, persistent grids) against the
pointer path's tuned configs and torch._grouped_mm, same run. Decode: eager host time with and without
KernelOp's direct launch."""
import json, os, statistics, sys, time
from collections.abc import Callable
import torch, triton
import kernels._library as lib
from bench import moe_cases
from kernels.fused_experts import expert_configs, launch_fused_experts, fused_experts

out_dir = os.environ.get("OUT", ".")
rows = []
def bench(fn: "Callable[[], object]") -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

VARIANTS = {
    "tuned": ({}, {}),
    "tma": ({"tma": True}, {"tma": True}),
    "tma-s4": ({"tma": True, "num_stages": 4}, {"tma": True, "num_stages": 4}),
    "tma-ws": ({"tma": True, "warp_specialize": True}, {"tma": True, "warp_specialize": True}),
    "tma-128x128x64-w8s4": ({"tma": True, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4},
                            {"tma": True, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4}),
    "tma-n256-k64-w8s3": ({"tma": True, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3},
                          {"tma": True, "block_n": 256, "block_k": 64, "num_warps": 8, "num_stages": 3}),
    "ptr-128x128x64-w8s4": ({"block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4},
                            {"block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4}),
}
print(f"{'shape':>8} {'T':>6} {'variant':>22} {'ms':>8} {'TF/s':>6} {'x gmm':>6} {'err':>8}")
for name, T in (("mixtral", 1024), ("mixtral", 4096), ("mixtral", 16384), ("qwen3", 1024), ("qwen3", 8192)):
    shape = moe_cases.SHAPES[name]
    x, gate_up, down, ids, weights = moe_cases.make_inputs(shape, T, "cuda", torch.bfloat16)
    base = expert_configs(x, shape.E, shape.I, ids.numel())
    ref = launch_fused_experts(x, gate_up, down, ids, weights, configs=base)
    gmm_ms = bench(lambda: moe_cases.grouped_mm(x, gate_up, down, ids, weights))
    for vname, (gu, dn) in VARIANTS.items():
        for persistent in (False, True) if vname in ("tma", "tma-ws") else (False,):
            cfg = (base[0] | gu, base[1] | dn)
            label = vname + ("-persist" if persistent else "")
            try:
                y = launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg, persistent=persistent)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = bench(lambda: launch_fused_experts(x, gate_up, down, ids, weights, configs=cfg, persistent=persistent))
            except Exception as exc:
                print(f"{name:>8} {T:>6} {label:>22} failed: {type(exc).__name__}: {str(exc)[:150]}")
                rows.append({"shape": name, "T": T, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            tf = moe_cases.flops(shape, T) / ms / 1e9
            rows.append({"shape": name, "T": T, "variant": label, "configs": cfg, "persistent": persistent, "ms": ms,
                         "tflops": tf, "grouped_mm_ms": gmm_ms, "ratio_grouped_mm": gmm_ms / ms, "rel_err_vs_tuned": err})
            print(f"{name:>8} {T:>6} {label:>22} {ms:8.3f} {tf:6.0f} {gmm_ms / ms:6.2f} {err:8.1e}", flush=True)

def host_ms(fn: "Callable[[], object]", n: int = 600) -> float:
    for _ in range(50): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e3

fast = lib.runs_untraced
print(f"{'shape':>8} {'T':>3} {'direct ms':>10} {'dispatch ms':>12} {'gmm ms':>8}  (host time per eager call, median)")
for name in ("qwen3", "mixtral", "olmoe"):
    shape = moe_cases.SHAPES[name]
    args = moe_cases.make_inputs(shape, 1, "cuda", torch.bfloat16)
    call = lambda: fused_experts(*args, validate_ids=False)
    res = {}
    for rep in range(2):
        lib.runs_untraced = fast; res.setdefault("direct", []).append(host_ms(call))
        lib.runs_untraced = lambda a: False; res.setdefault("dispatch", []).append(host_ms(call))
    lib.runs_untraced = fast
    gmm = host_ms(lambda: moe_cases.grouped_mm(*args))
    d, s = min(res["direct"]), min(res["dispatch"])
    rows.append({"shape": name, "T": 1, "host_ms_direct": res["direct"], "host_ms_dispatch": res["dispatch"],
                 "host_ms_grouped_mm": gmm})
    print(f"{name:>8} {1:>3} {d:10.4f} {s:12.4f} {gmm:8.4f}", flush=True)

from calibration.results import provenance, write_json_atomic
write_json_atomic(os.path.join(out_dir, "probe_tma.json"), {"provenance": provenance(), "rows": rows})
