"""Same-run A/B: the FP8 row quantizer's one pass (rows <= 8192) against two passes; CUDA-graph medians."""
import json, os
import torch
import triton.testing
from kernels.quantize import launch_quantize_fp8
rows = []
for M, K in [(1, 2048), (1, 4096), (1, 7168), (16, 4096), (64, 4096), (256, 4096), (4096, 4096), (64, 8192)]:
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    q1, s1 = launch_quantize_fp8(x)
    q2, s2 = launch_quantize_fp8(x, one_pass_max_k=0)
    same = bool(torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2))
    times = {}
    for name, limit in (("one_pass", 8192), ("two_pass", 0), ("one_pass_again", 8192)):
        times[name] = triton.testing.do_bench_cudagraph(lambda: launch_quantize_fp8(x, limit), rep=200,
                                                        return_mode="median") * 1e3
    rows.append({"M": M, "K": K, "same_output": same, **{f"{k}_us": v for k, v in times.items()}})
    print(f"M{M:5d} K{K:5d} one {times['one_pass']:6.2f} us  two {times['two_pass']:6.2f} us  again "
          f"{times['one_pass_again']:6.2f} us  ratio {times['two_pass'] / times['one_pass']:.2f}  same {same}")
json.dump({"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT"), "rows": rows},
          open(os.path.join(os.environ["OUT"], "quantize_ab.json"), "w"), indent=1)
