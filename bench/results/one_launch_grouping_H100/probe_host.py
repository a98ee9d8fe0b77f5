"""Eager host time and graph time of fused_experts at decode: one-launch grouping vs the grid build."""
import statistics, time, torch
import kernels.expert_blocks as eb
from kernels.fused_experts import fused_experts

def case(E: int, H: int, I: int, K: int, T: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)]).int()
    wts = torch.rand(T, K, device="cuda")
    return x, w1, w2, ids, wts

def eager_ms(args: tuple, n: int = 300) -> float:
    for _ in range(20): fused_experts(*args, validate_ids=False)
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fused_experts(*args, validate_ids=False); ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e3

def graph_ms(args: tuple, calls: int = 50, reps: int = 20) -> float:
    fused_experts(*args, validate_ids=False); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls): fused_experts(*args, validate_ids=False)
    g.replay(); torch.cuda.synchronize(); out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True); a.record(); g.replay(); b.record(); b.synchronize()
        out.append(a.elapsed_time(b) / calls)
    return statistics.median(out)

print(f"{'shape':>8} {'T':>3} {'build':>10} {'eager host ms':>14} {'graph ms':>9}")
for name, dims in (("qwen3", (128, 2048, 768, 8)), ("mixtral", (8, 4096, 14336, 2))):
    for T in (1, 4, 16):
        args = case(*dims, T)
        ref = None
        for build, slots in (("grid", 0), ("one", 256)):
            eb.ONE_LAUNCH_SLOTS = slots
            out = fused_experts(*args, validate_ids=False)
            ref = out if ref is None else ref
            assert torch.equal(out, ref), "builds disagree"
            print(f"{name:>8} {T:>3} {build:>10} {eager_ms(args):>14.4f} {graph_ms(args):>9.4f}")
