"""Flash attention and the standalone QKᵀ / softmax·V kernels against float64 torch SDPA."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import launch_flash_attention, attention_av_reference, attention_qk_reference, flash_attention_reference
from tests.conftest import DTYPES, assert_matches, randn

# (B, H_q, H_kv, S_q, S_kv, D): what each exercises
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 32, id="S1"),
    pytest.param(2, 4, 2, 37, 37, 64, id="odd-S-gqa2"),
    pytest.param(1, 2, 1, 1, 70, 128, id="decode-Sq1"),
    pytest.param(1, 2, 2, 65, 33, 32, id="Sq>Skv"),
    pytest.param(1, 3, 1, 17, 130, 64, id="Sq<Skv-gqa3"),
    pytest.param(1, 1, 1, 200, 200, 128, id="multi-block"),
]


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype):
    return randn(B, Hq, Sq, D, dtype=dtype), randn(B, Hkv, Skv, D, dtype=dtype), randn(B, Hkv, Skv, D, dtype=dtype)


def sdpa64(q, k, v, causal, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D", SHAPES)
def test_flash_attention_matches_sdpa(B, Hq, Hkv, Sq, Skv, D, dtype, causal):
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    assert_matches(kernels.flash_attention(q, k, v, causal=causal), sdpa64(q, k, v, causal), dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D", SHAPES[:4])
def test_qk_then_av_equals_attention(B, Hq, Hkv, Sq, Skv, D, dtype, causal):
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    scores = kernels.attention_qk(q, k)
    assert_matches(scores, attention_qk_reference(q.double(), k.double()), dtype)
    out = kernels.attention_av(scores, v, causal=causal)
    assert_matches(out, attention_av_reference(scores.double(), v.double(), causal), dtype)
    assert_matches(out, sdpa64(q, k, v, causal), dtype)


VARIANTS = {
    "pointer": dict(block_m=16, block_n=32, num_warps=4, num_stages=2),
    "tma": dict(block_m=16, block_n=32, num_warps=4, num_stages=2, tma=True),
    "tma-ws": dict(block_m=16, block_n=32, num_warps=4, num_stages=2, tma=True, warp_specialize=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Skv, D", [SHAPES[1], SHAPES[3], SHAPES[4]])
def test_flash_attention_kernel_variants(B, Hq, Hkv, Sq, Skv, D, causal, dtype, variant):
    """Every kernel variant a config can pick, with tails that cross block and head boundaries."""
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype)
    out = launch_flash_attention(q, k, v, causal, D ** -0.5, cfg=VARIANTS[variant])
    assert_matches(out, sdpa64(q, k, v, causal), dtype)


def test_reference_is_sdpa():
    q, k, v = qkv(1, 4, 2, 9, 13, 32, torch.float64)
    for causal in (True, False):
        assert torch.allclose(flash_attention_reference(q, k, v, causal), sdpa64(q, k, v, causal))


def test_custom_scale_and_strided_layout():
    """[B, S, H, D] storage transposed to [B, H, S, D] is read through its strides."""
    q, k, v = (randn(2, 21, 3, 64).transpose(1, 2) for _ in range(3))
    out = kernels.flash_attention(q, k, v, causal=True, sm_scale=0.3)
    assert_matches(out, sdpa64(q, k, v, True, scale=0.3), torch.float32)


@pytest.mark.parametrize("sm_scale", [-4.0, 0.0, 1e-3])
@pytest.mark.parametrize("causal", [True, False])
def test_non_positive_and_tiny_scales(sm_scale, causal):
    """A positive scale is folded into the softmax's exp2; zero and negative ones take the scaled path
    (the row max does not commute with a negative scale), masked keys included."""
    q, k, v = qkv(1, 2, 2, 70, 70, 32, torch.float32)
    out = kernels.flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
    # SDPA's math backend scales q and k by sqrt(scale) (NaN below 0): the reference scales the scores
    ref = flash_attention_reference(q.double(), k.double(), v.double(), causal, sm_scale)
    assert_matches(out, ref.float(), torch.float32)


def test_empty_batch_and_queries():
    q, k, v = qkv(0, 2, 2, 5, 5, 32, torch.float32)
    assert kernels.flash_attention(q, k, v).shape == (0, 2, 5, 32)
    q, k, v = qkv(1, 2, 2, 0, 5, 32, torch.float32)
    assert kernels.flash_attention(q, k, v).shape == (1, 2, 0, 32)


def test_flash_attention_gradients_match_reference():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 11, 11, 32, torch.float32))
    grad_out = randn(1, 2, 11, 32)
    ours = torch.autograd.grad(kernels.flash_attention(q, k, v), (q, k, v), grad_out)
    ref = torch.autograd.grad(sdpa64(q, k, v, True).float(), (q, k, v), grad_out)
    for name, g, r in zip("qkv", ours, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5), f"gradient of {name} differs"


def _args():
    return qkv(1, 4, 2, 8, 8, 32, torch.float32)


BAD_INPUT = [
    ("q", lambda q, k, v: dict(q=q[0], k=k, v=v), ValueError),
    ("q", lambda q, k, v: dict(q=q[..., :16], k=k, v=v), ValueError),
    ("q", lambda q, k, v: dict(q=q.transpose(2, 3), k=k, v=v), ValueError),
    ("q", lambda q, k, v: dict(q=q.tolist(), k=k, v=v), TypeError),
    ("k", lambda q, k, v: dict(q=q, k=k.half(), v=v), TypeError),
    ("k", lambda q, k, v: dict(q=q, k=k[:, :1].expand(1, 3, 8, 32), v=v), ValueError),
    ("k", lambda q, k, v: dict(q=q, k=k[..., :16], v=v), ValueError),
    ("k", lambda q, k, v: dict(q=q, k=torch.cat([k, k]), v=v), ValueError),
    ("v", lambda q, k, v: dict(q=q, k=k, v=v[:, :, :5]), ValueError),
    ("v", lambda q, k, v: dict(q=q, k=k, v=v[:, :1]), ValueError),
    ("sm_scale", lambda q, k, v: dict(q=q, k=k, v=v, sm_scale=float("nan")), ValueError),
    ("sm_scale", lambda q, k, v: dict(q=q, k=k, v=v, sm_scale="0.1"), TypeError),
    ("sm_scale", lambda q, k, v: dict(q=q, k=k, v=v, sm_scale=1e39), ValueError),  # past float32: NaN scores
    ("sm_scale", lambda q, k, v: dict(q=q, k=k, v=v, sm_scale=-10 ** 400), ValueError),  # no float at all
    ("causal", lambda q, k, v: dict(q=q, k=k, v=v, causal=None), TypeError),
    ("sequence length 0", lambda q, k, v: dict(q=q, k=k[:, :, :0], v=v[:, :, :0]), ValueError),
    ("k has size 32 in dim 3; expected 64 .the head dim of q",
     lambda q, k, v: dict(q=torch.cat([q, q], -1), k=k, v=v), ValueError),  # supported dims, mismatched
    ("v has size 64 in dim 3; expected 32", lambda q, k, v: dict(q=q, k=k, v=torch.cat([v, v], -1)), ValueError),
    ("causal", lambda q, k, v: dict(q=q, k=k, v=v, causal=1), TypeError),
    ("causal", lambda q, k, v: dict(q=q, k=k, v=v, causal="False"), TypeError),
]


@pytest.mark.parametrize("name, corrupt, error", BAD_INPUT, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUT)])
def test_flash_attention_bad_input(name, corrupt, error):
    with pytest.raises(error, match=name):
        kernels.flash_attention(**corrupt(*_args()))


def test_numpy_bool_causal_is_a_bool():
    q, k, v = _args()
    assert torch.equal(kernels.flash_attention(q, k, v, causal=np.bool_(True)), kernels.flash_attention(q, k, v))


def test_masked_score_blocks_give_the_reference_not_nan():
    """Scores whose first key blocks are all -inf (left padding) must not poison the online softmax."""
    scores = randn(1, 2, 4, 130)
    scores[..., :80] = -math.inf
    v = randn(1, 2, 130, 32)
    assert_matches(kernels.attention_av(scores, v), attention_av_reference(scores.double(), v.double()), torch.float32)


def test_qk_av_bad_input():
    q, k, v = _args()
    with pytest.raises(ValueError, match="k"):
        kernels.attention_qk(q, k[..., :16])
    with pytest.raises(ValueError, match="k has size 32 in dim 3; expected 64"):
        kernels.attention_qk(torch.cat([q, q], -1), k)
    scores = kernels.attention_qk(q, k)
    with pytest.raises(ValueError, match="v"):
        kernels.attention_av(scores, v[:, :, :7])
    with pytest.raises(ValueError, match="scores"):
        kernels.attention_av(scores.transpose(2, 3), v)
    with pytest.raises(TypeError, match="scores"):
        kernels.attention_av(scores.to(torch.int64), v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="6.4 GB of scores: a GPU test")
def test_qk_and_av_past_two_to_the_31_score_elements():
    """[16, 12, 4096, 4096] scores hold 3.2e9 elements: the last head's offsets overflow 32 bits
    (an illegal memory access before they were 64-bit). Its scores and outputs match the reference."""
    q, k, v = (torch.randn(16, 12, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scores = kernels.attention_qk(q, k)
    last = (slice(15, 16), slice(11, 12))
    assert_matches(scores[last], attention_qk_reference(q[last], k[last]), torch.bfloat16)
    out = kernels.attention_av(scores, v, causal=True)
    assert_matches(out[last], attention_av_reference(scores[last], v[last], causal=True), torch.bfloat16)
