"""The routing kernel at logit row strides that are not multiples of 16: runtime stride (as committed) vs the
stride as a constexpr vs stride and E as constexprs; graph replays, same run, outputs compared."""
import torch, triton
import triton.language as tl
from kernels.routing import (_probabilities, _bias_vector, _selection, _top_k, _renormalized, topk_routing,
                             launch_config, _next_pow2)
from kernels.tiles import cdiv

@triton.jit
def _k(p_logits, p_bias, p_weights, p_ids, p_nan_tokens, T, E_RT, stride_bias,
       STRIDE_LT: tl.constexpr, E_CT: tl.constexpr, E_CONST: tl.constexpr,
       TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
       HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr):
    if E_CONST:
        E = E_CT
    else:
        E = E_RT
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)
    m_t, m_e = o_t < T, o_e < E
    b_probs, m_nan = _probabilities(p_logits, o_t, o_e, m_t, m_e, STRIDE_LT)
    tl.atomic_add(p_nan_tokens, tl.sum(m_nan.to(tl.int32), 0))
    b_bias = _bias_vector(p_bias, stride_bias, o_e, E, BLOCK_E, HAS_BIAS)
    b_select, b_gate = _selection(b_probs, b_bias[None, :], m_e)
    b_ids, b_weights = _top_k(b_select, b_gate, o_e, o_k, TOP_K, BLOCK_T, BLOCK_K)
    b_weights = _renormalized(b_weights, RENORMALIZE)
    m_out = m_t[:, None] & (o_k[None, :] < TOP_K)
    tl.store(p_ids + o_t[:, None] * TOP_K + o_k[None, :], b_ids, mask=m_out)
    tl.store(p_weights + o_t[:, None] * TOP_K + o_k[None, :], b_weights, mask=m_out)

def variant(logits, top_k, e_const):
    T, E = logits.shape
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
    nan = torch.zeros(1, dtype=torch.int32, device=logits.device)
    bt, nw = launch_config("topk_routing", T, E, logits.device)
    _k[(cdiv(T, bt),)](logits, None, w, ids, nan, T, E, 0, STRIDE_LT=logits.stride(0), E_CT=E, E_CONST=e_const,
                       TOP_K=top_k, BLOCK_T=bt, BLOCK_E=_next_pow2(E), BLOCK_K=_next_pow2(top_k), HAS_BIAS=False,
                       RENORMALIZE=True, num_warps=nw)
    return w, ids

def g(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

for E, K in ((60, 4), (120, 8), (64, 4)):
    for T in (3, 48, 768):
        a = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
        ref = topk_routing(a, K)
        for ec in (False, True):
            w, ids = variant(a, K, ec)
            d_ids = (ids != ref.topk_ids).sum().item()
            d_w = (w - ref.topk_weights).abs().max().item()
            print(f"  check E={E} T={T} e_const={ec}: ids differ {d_ids}, max weight diff {d_w:.1e}")
        print(f"E={E} T={T}: runtime stride {g(lambda: topk_routing(a, K)):.2f}  constexpr stride "
              f"{g(lambda: variant(a, K, False)):.2f}  constexpr stride+E {g(lambda: variant(a, K, True)):.2f} us",
              flush=True)
