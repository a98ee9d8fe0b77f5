import statistics, time, torch, triton
import kernels
from kernels import _config
from kernels.matmul import launch_matmul, _matmul_kernel, check_projection
from kernels.attention import _flash_attention

def host_us(fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(n):
        s = time.perf_counter(); fn(); t.append(time.perf_counter() - s)
    torch.cuda.synchronize()
    return statistics.median(t) * 1e6

x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
y = torch.empty(16, 1024, device="cuda", dtype=torch.bfloat16)
cfg = _config.lookup("matmul", x.device, m=16, n=1024, k=256, elem_bytes=2)
q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
rows = {
    "torch x @ w.T": lambda: x @ w.T,
    "torch.empty": lambda: torch.empty((16, 1024), dtype=x.dtype, device=x.device),
    "config lookup": lambda: _config.lookup("matmul", x.device, m=16, n=1024, k=256, elem_bytes=2),
    "check_projection": lambda: check_projection("x", x, "weight", w),
    "raw triton launch": lambda: _matmul_kernel[(16,)](x, w, y, 16, 1024, 256, 256, 1, 256, 1, 1024, 1,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=8, EVEN_K=True,
        FUSE_SWIGLU=False, DOT_PRECISION="tf32", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    "launch_matmul": lambda: launch_matmul(x, w),
    "kernels.matmul": lambda: kernels.matmul(x, w),
    "_flash_attention": lambda: _flash_attention(q, q, q, True, 0.125),
    "kernels.flash_attention": lambda: kernels.flash_attention(q, q, q),
    "torch sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
}
for name, fn in rows.items():
    print(f"{name:28} {host_us(fn):8.1f} us")
