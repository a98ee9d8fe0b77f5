"""Probe: what programmatic dependent launch (PDL) saves per kernel boundary in a CUDA graph.
A chain of N small streaming kernels (each reads the previous one's output and a private 'weight'
of W bytes), captured in a graph, with and without launch_pdl; GDC waits before the dependent read,
and the weight read is issued before the wait in the 'early' variant."""
import json, os
import torch, triton, triton.language as tl
from bench.kernels import graph_median_ms

@triton.jit
def step(p_in, p_w, p_out, n_w, BLOCK: tl.constexpr, GDC: tl.constexpr, EARLY: tl.constexpr):
    pid = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    if EARLY:
        for k in range(pid * BLOCK, n_w, tl.num_programs(0) * BLOCK):
            acc += tl.load(p_w + k + o, mask=k + o < n_w, other=0.0).to(tl.float32)
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if not EARLY:
        for k in range(pid * BLOCK, n_w, tl.num_programs(0) * BLOCK):
            acc += tl.load(p_w + k + o, mask=k + o < n_w, other=0.0).to(tl.float32)
    x = tl.load(p_in + pid * BLOCK + o)
    tl.store(p_out + pid * BLOCK + o, x + acc)

def chain(bufs, ws, n_prog, gdc, early):
    for i, w in enumerate(ws):
        step[(n_prog,)](bufs[i], w, bufs[i + 1], w.numel(), BLOCK=1024, GDC=gdc, EARLY=early, launch_pdl=gdc)
    return bufs[-1]

rows = []
for n_kernels in (5,):
    for w_mb in (0.0, 4.0, 16.0):
        n_prog = 132
        ws = [torch.randn(max(int(w_mb * 2**20 / 2), 1024), device="cuda").bfloat16() for _ in range(n_kernels)]
        bufs = [torch.randn(n_prog * 1024, device="cuda") for _ in range(n_kernels + 1)]
        ref = chain(bufs, ws, n_prog, False, False).clone()
        r = {"kernels": n_kernels, "weight_mb_each": w_mb}
        for name, gdc, early in (("plain", False, False), ("pdl", True, False), ("pdl_early", True, True)):
            out = chain(bufs, ws, n_prog, gdc, early)
            r[name + "_ok"] = bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-2))
            r[name + "_us"] = 1e3 * graph_median_ms(lambda: chain(bufs, ws, n_prog, gdc, early))
        rows.append(r)
        print(r, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "pdl_probe.json"), "w"), indent=1)
