"""Flash attention variants (heavy-first causal order, scale folded into the exp2 argument) against SDPA's
default backend in the same run; B8 H32 S2048 D128 causal and the other bench shapes."""
import json, os, statistics, sys
import torch, triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ((8, 32, 32, 2048, 128), (4, 16, 16, 4096, 64), (8, 32, 8, 2048, 128)) if DEV == "cuda" else ((1, 2, 2, 80, 32),)
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from kernels.attention import _load_rows, _kv_ranges, LOG2_E, flash_attention

@triton.jit
def _step(b_acc, b_l, b_m, b_s, b_v, scale, FMA: tl.constexpr, GUARD: tl.constexpr):
    if FMA:  # b_s unscaled: max on raw scores, one FMA per element
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * scale)
        if GUARD:
            b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        else:
            b_base = b_m_new
        b_p = tl.math.exp2(b_s * scale - b_base[:, None])
    else:
        b_s = b_s * scale
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        if GUARD:
            b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        else:
            b_base = b_m_new
        b_p = tl.math.exp2(b_s - b_base[:, None])
    b_alpha = tl.math.exp2(b_m - b_base)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
    return b_acc, b_l, b_m_new

@triton.jit
def _kernel(src_q, src_k, src_v, dst_o, qk_scale_log2, S_Q, S_KV, HEADS_Q, GQA_GROUP,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            REVERSE: tl.constexpr, FMA: tl.constexpr, GUARD_FULL: tl.constexpr, WS: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    if REVERSE:
        i_m = tl.num_programs(0) - 1 - i_m
    i_b, i_h = i_bh // HEADS_Q, i_bh % HEADS_Q
    i_hkv = i_h // GQA_GROUP
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    b_q = _load_rows(src_q, i_b, i_h, m0, S_Q, 0, 0, 0, BLOCK_M, HEAD_DIM, True, True)
    b_m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    n_full, n_end = _kv_ranges(i_m, S_KV, BLOCK_M, BLOCK_N, CAUSAL)
    for n0 in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        b_k = _load_rows(src_k, i_b, i_hkv, n0, S_KV, 0, 0, 0, BLOCK_N, HEAD_DIM, True, False)
        b_s = tl.dot(b_q, b_k.T)
        b_v = _load_rows(src_v, i_b, i_hkv, n0, S_KV, 0, 0, 0, BLOCK_N, HEAD_DIM, True, False)
        b_acc, b_l, b_m = _step(b_acc, b_l, b_m, b_s, b_v, qk_scale_log2, FMA, GUARD_FULL)
    for n0 in range(n_full, n_end, BLOCK_N):
        b_k = _load_rows(src_k, i_b, i_hkv, n0, S_KV, 0, 0, 0, BLOCK_N, HEAD_DIM, True, True)
        b_s = tl.dot(b_q, b_k.T)
        m_valid = (n0 + o_n)[None, :] < S_KV
        if CAUSAL:
            m_valid = m_valid & ((n0 + o_n)[None, :] <= o_m[:, None])
        b_s = tl.where(m_valid, b_s, float("-inf"))
        b_v = _load_rows(src_v, i_b, i_hkv, n0, S_KV, 0, 0, 0, BLOCK_N, HEAD_DIM, True, True)
        b_acc, b_l, b_m = _step(b_acc, b_l, b_m, b_s, b_v, qk_scale_log2, FMA, True)
    b_o = b_acc / b_l[:, None]
    dst_o.store([i_b, i_h, m0, 0], b_o.to(dst_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))

def launch(q, k, v, bm, bn, warps, stages, reverse, fma, guard_full, ws=False):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    dq, do = TensorDescriptor.from_tensor(q, [1, 1, bm, D]), TensorDescriptor.from_tensor(o, [1, 1, bm, D])
    dk, dv = TensorDescriptor.from_tensor(k, [1, 1, bn, D]), TensorDescriptor.from_tensor(v, [1, 1, bn, D])
    _kernel[(triton.cdiv(S, bm), B * H)](dq, dk, dv, do, D ** -0.5 * LOG2_E, S, k.shape[2], H, H // k.shape[1],
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, REVERSE=reverse, FMA=fma, GUARD_FULL=guard_full, WS=ws,
        num_warps=warps, num_stages=stages)
    return o

def bench(fn):
    if DEV == "cpu":
        return 1.0
    return triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")

rows = []
out = os.environ.get("OUT", ".")
for (B, H, HKV, S, D) in SHAPES:
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, S, D, device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float16, generator=g)
    k = torch.randn(B, HKV, S, D, device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float16, generator=g)
    v = torch.randn(B, HKV, S, D, device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=HKV != H)
    sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=HKV != H))
    ours = bench(lambda: flash_attention(q, k, v, True))
    flops = 4 * B * H * S * S * D / 2
    print(f"B{B} H{H}/{HKV} S{S} D{D}: sdpa {sdpa:.4f} ms ({flops/sdpa/1e9:.0f} TF/s), ours now {ours:.4f} ({sdpa/ours:.3f}x)")
    rows.append(dict(shape=[B, H, HKV, S, D], sdpa_ms=sdpa, current_ms=ours))
    first = S == 2048 and HKV == H
    cfgs = ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)) if first else ((64, 64, 4, 3), (128, 128, 8, 3))
    for bm, bn, w, st in cfgs:
        for rev, fma, gf, ws in ((0, 0, 1, 0), (1, 0, 1, 0), (1, 1, 0, 0), (1, 1, 0, 1)):
            try:
                y = launch(q, k, v, bm, bn, w, st, rev, fma, gf, ws)
                err = ((y.float() - ref.float()).abs().max()).item()
                ms = bench(lambda: launch(q, k, v, bm, bn, w, st, rev, fma, gf, ws))
            except Exception as exc:
                print(f"  {bm}x{bn} w{w} s{st} rev{rev} fma{fma} guard{gf} ws{ws}: {type(exc).__name__} {str(exc)[:80]}")
                continue
            rows.append(dict(shape=[B, H, HKV, S, D], bm=bm, bn=bn, warps=w, stages=st, reverse=rev, fma=fma,
                             guard_full=gf, ws=ws, ms=ms, max_abs_err=err, x_sdpa=sdpa / ms))
            print(f"  {bm}x{bn} w{w} s{st} rev{rev} fma{fma} guard{gf} ws{ws}: {ms:.4f} ms {sdpa/ms:.3f}x sdpa err {err:.1e}", flush=True)
json.dump(rows, open(f"{out}/probe_attn.json", "w"), indent=1)
