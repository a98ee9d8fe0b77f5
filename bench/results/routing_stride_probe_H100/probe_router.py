"""moe_router at 60 vs 64 experts: the gate GEMM (cuBLAS) alone and the whole TopKRouter call, graph replays."""
import torch, triton, kernels
def g(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
print(f"{'H':>5} {'E':>3} {'K':>2} {'T':>4} {'gemm us':>8} {'router us':>9}")
for H, K in ((3584, 4), (5120, 6)):
    for E in (60, 64):
        for T in (3, 48, 768):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
            r = kernels.TopKRouter(w, K)
            with torch.no_grad():
                print(f"{H:5d} {E:3d} {K:2d} {T:4d} {g(lambda: x @ w.T):8.2f} {g(lambda: r(x)):9.2f}", flush=True)
