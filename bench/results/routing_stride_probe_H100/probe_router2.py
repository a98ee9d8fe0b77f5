import torch, kernels
from torch.profiler import profile, ProfilerActivity
for E in (60, 64):
    x = torch.randn(48, 3584, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, 3584, device="cuda", dtype=torch.bfloat16) * 0.02
    r = kernels.TopKRouter(w, 4)
    with torch.no_grad():
        for _ in range(20): r(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(50): r(x)
            torch.cuda.synchronize()
    print(f"== E={E}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
