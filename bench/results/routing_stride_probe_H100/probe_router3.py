import torch, triton
from kernels.routing import topk_routing
def g(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
for T in (3, 48, 768):
    a60 = torch.randn(T, 60, device="cuda", dtype=torch.bfloat16)
    a64 = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16)
    v60 = a64[:, :60]
    a48 = torch.randn(T, 48, device="cuda", dtype=torch.bfloat16)
    a128 = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
    a120 = torch.randn(T, 120, device="cuda", dtype=torch.bfloat16)
    print(f"T={T}: E60 stride60 {g(lambda: topk_routing(a60, 4)):.2f}  E60 stride64 {g(lambda: topk_routing(v60, 4)):.2f}  "
          f"E64 {g(lambda: topk_routing(a64, 4)):.2f}  E48 {g(lambda: topk_routing(a48, 4)):.2f}  "
          f"E120 {g(lambda: topk_routing(a120, 4)):.2f}  E128 {g(lambda: topk_routing(a128, 4)):.2f} us", flush=True)
