"""kernels.decode_attention: one query per sequence against a static cache whose length lives on the device."""
import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_reference
from tests.conftest import DEVICE, DTYPES, assert_matches, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, capacity, head_dim", [(4, 4, 70, 32), (4, 2, 129, 64), (2, 1, 5, 128)],
                         ids=["mha-odd", "gqa", "tiny"])
def test_matches_the_reference(dtype, heads, kv_heads, capacity, head_dim):
    B = 3
    q = randn(B, heads, 1, head_dim, dtype=dtype)
    k, v = (randn(B, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([1, capacity // 2 + 1, capacity], dtype=torch.int32, device=DEVICE)
    assert_matches(decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths), dtype)


def test_positions_past_the_length_are_never_read():
    q, k, v = (randn(2, 2, n, 32) for n in (1, 40, 40))
    lengths = torch.tensor([17], dtype=torch.int32, device=DEVICE)  # shared by both sequences
    expected = decode_attention(q, k, v, lengths)
    k[:, :, 17:], v[:, :, 17:] = float("nan"), float("nan")
    assert torch.equal(decode_attention(q, k, v, lengths), expected)


def test_empty_cache_gives_zeros_and_long_lengths_clamp():
    q, k, v = (randn(1, 2, n, 32) for n in (1, 8, 8))
    assert torch.equal(decode_attention(q, k, v, torch.zeros(1, dtype=torch.int32, device=DEVICE)),
                       torch.zeros_like(q))
    clamped = decode_attention(q, k, v, torch.tensor([100], device=DEVICE))
    assert torch.allclose(clamped, decode_attention(q, k, v, torch.tensor([8], device=DEVICE)))


@pytest.mark.parametrize("change, error, phrase", [
    (lambda a: a | {"q": randn(2, 2, 3, 32)}, ValueError, "one query"),
    (lambda a: a | {"q": randn(2, 2, 1, 48)}, ValueError, "head dim"),
    (lambda a: a | {"k_cache": randn(2, 2, 8, 64)}, ValueError, "k_cache"),
    (lambda a: a | {"v_cache": randn(2, 2, 9, 32)}, ValueError, "v_cache"),
    (lambda a: a | {"k_cache": randn(2, 3, 8, 32), "v_cache": randn(2, 3, 8, 32)}, ValueError, "heads"),
    (lambda a: a | {"kv_lengths": torch.ones(1, device=DEVICE)}, TypeError, "kv_lengths"),
    (lambda a: a | {"kv_lengths": torch.ones(3, dtype=torch.int32, device=DEVICE)}, ValueError, "kv_lengths"),
    (lambda a: a | {"q": a["q"].half()}, TypeError, "k_cache"),
    (lambda a: a | {"q": [1.0]}, TypeError, "q"),
    (lambda a: a | {"q": randn(2, 2, 1, 64)[..., ::2]}, ValueError, "q must be contiguous in its last"),
    (lambda a: a | {"sm_scale": "a"}, TypeError, "sm_scale"),
    (lambda a: a | {"sm_scale": float("inf")}, ValueError, "sm_scale"),
    (lambda a: a | {"sm_scale": 1e39}, ValueError, "sm_scale"),
    (lambda a: a | {"kv_lengths": torch.ones(2, dtype=torch.int32, device="meta")}, ValueError, "kv_lengths"),
], ids=["queries", "head-dim", "k-dim", "v-shape", "gqa", "length-dtype", "length-size", "dtype", "type",
        "q-stride", "scale-type", "scale-inf", "scale-past-float32", "lengths-on-meta"])
def test_bad_input_names_the_argument(change, error, phrase):
    args = {"q": randn(2, 2, 1, 32), "k_cache": randn(2, 2, 8, 32), "v_cache": randn(2, 2, 8, 32),
            "kv_lengths": torch.tensor([3], dtype=torch.int32, device=DEVICE)}
    with pytest.raises(error, match=phrase):
        decode_attention(**change(args))


def test_lengths_at_or_below_zero_read_nothing_and_nan_is_not_hidden():
    q, k, v = randn(3, 2, 1, 32), randn(3, 2, 8, 32), randn(3, 2, 8, 32)
    lengths = torch.tensor([-4, 0, 5], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, lengths)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.allclose(out, decode_attention_reference(q, k, v, lengths), rtol=1e-5, atol=1e-6)
    k[2, 0, 1] = float("inf")  # a +Inf score: NaN in the kernel, and in the reference too
    assert decode_attention(q, k, v, lengths)[2, 0].isnan().all()
    assert decode_attention_reference(q, k, v, lengths)[2, 0].isnan().all()


def test_gradients_come_from_the_reference():
    q, k, v = (randn(2, 2, 1, 32).requires_grad_(), randn(2, 1, 8, 32).requires_grad_(),
               randn(2, 1, 8, 32).requires_grad_())
    lengths = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, lengths)
    assert out.requires_grad
    grad_out = randn(*out.shape)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = torch.autograd.grad(decode_attention_reference(q, k, v, lengths), (q, k, v), grad_out)
    for g, r in zip(ours, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)
