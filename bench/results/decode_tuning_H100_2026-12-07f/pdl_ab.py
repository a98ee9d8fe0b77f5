"""Same-run A/B: the fused experts (bf16 and FP8) with programmatic dependent launch on and off,
CUDA-graph replay medians (us), interleaved; also 'route + experts' (the layer's kernels after the router GEMM)."""
import json, os
import torch, triton
import kernels
from bench import moe_cases
from bench.moe_cases import fp8_calls  # bench.fp8_moe.fp8_calls when this ran (286fe7b)
from bench.kernels import graph_median_ms, copy_bytes_per_s
from kernels.dependent_launch import PDL_ENV

rows = []
bw = copy_bytes_per_s()
for name in os.environ.get("SHAPES", "qwen3,mixtral").split(","):
    shape = moe_cases.SHAPES[name]
    for T in (1, 4, 16):
        inputs = moe_cases.make_inputs(shape, T, "cuda", torch.bfloat16)
        fp8 = fp8_calls(*inputs)["fp8"]
        bf16 = lambda: moe_cases.ours(*inputs)
        logits = torch.randn(T, shape.E, device="cuda")
        layer = lambda: (lambda r: kernels.fused_experts(inputs[0], inputs[1], inputs[2], r.topk_ids, r.topk_weights,
                                                         validate_ids=False))(kernels.route(logits, shape.K))
        r = {"shape": name, "T": T, "floor_fp8_us": 1e3 * moe_cases.floor_ms(shape, inputs[3], torch.float8_e4m3fn, bw, 4)[0],
             "floor_bf16_us": 1e3 * moe_cases.floor_ms(shape, inputs[3], torch.bfloat16, bw)[0]}
        for rep in range(2):
            for pdl in ("0", "1"):
                os.environ[PDL_ENV] = pdl
                for label, fn in (("bf16", bf16), ("fp8", fp8), ("route_bf16", layer)):
                    ref = fn().float()
                    us = 1e3 * graph_median_ms(fn)
                    r.setdefault(f"{label}_pdl{pdl}_us", []).append(us)
                    if pdl == "1":
                        os.environ[PDL_ENV] = "0"; base = fn().float(); os.environ[PDL_ENV] = "1"
                        r[f"{label}_same_bits"] = bool(torch.equal(ref, base))
        for k in list(r):
            if k.endswith("_us") and isinstance(r[k], list):
                r[k] = min(r[k])
        rows.append(r)
        print(f"{name:8s} T={T:3d} bf16 {r['bf16_pdl0_us']:7.1f} -> {r['bf16_pdl1_us']:7.1f}  fp8 {r['fp8_pdl0_us']:7.1f} -> "
              f"{r['fp8_pdl1_us']:7.1f}  route+bf16 {r['route_bf16_pdl0_us']:7.1f} -> {r['route_bf16_pdl1_us']:7.1f}  "
              f"floor fp8 {r['floor_fp8_us']:6.1f} bf16 {r['floor_bf16_us']:6.1f}  same {r['bf16_same_bits']},{r['fp8_same_bits']}", flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": os.environ.get("GIT_COMMIT"), "copy_bytes_per_s": bw, "rows": rows},
          open(os.path.join(os.environ.get("OUT", "."), "pdl_ab.json"), "w"), indent=1)
