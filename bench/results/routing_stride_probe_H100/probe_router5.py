"""The committed routing kernels (logit row stride a constexpr, 110538b) against the kernel before it,
at 4..128 experts; CUDA-graph replays, same run, outputs compared; policy routing ('active') timed too."""
import json, os, sys, torch, triton
sys.path.insert(0, os.path.dirname(__file__))
import routing_old
from kernels.routing import topk_routing
from kernels.policy_routing import policy_routing

def g(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

rows = []
print(f"{'E':>4} {'K':>2} {'T':>5} {'before us':>10} {'now us':>8} {'ratio':>6} {'policy us':>10}  check")
for E, K in ((4, 2), (8, 2), (60, 4), (64, 4), (120, 8), (128, 8)):
    for T in (1, 3, 48, 768, 4096):
        a = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        new, old = topk_routing(a, K), routing_old.topk_routing(a, K)
        same_ids = torch.equal(new.topk_ids, old.topk_ids)
        w_diff = (new.topk_weights - old.topk_weights).abs().max().item()
        before, now = g(lambda: routing_old.topk_routing(a, K)), g(lambda: topk_routing(a, K))
        pol = g(lambda: policy_routing(a, K, fill="active", keep_top_k=max(K // 2, 1)))
        rows.append(dict(E=E, K=K, T=T, before_us=before, now_us=now, policy_active_us=pol, same_ids=same_ids,
                         max_weight_diff=w_diff))
        print(f"{E:>4} {K:>2} {T:>5} {before:>10.2f} {now:>8.2f} {before / now:>6.2f} {pol:>10.2f}  "
              f"ids {'same' if same_ids else 'DIFFER'}, weights {w_diff:.1e}", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "probe_router5.json"), "w"), indent=1)
