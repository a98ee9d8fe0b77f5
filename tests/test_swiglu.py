"""The Triton GEMM and SwiGLU FFN against their float64 torch references."""
import pytest
import torch

import kernels
from kernels.matmul import launch_matmul, matmul_reference
from kernels.swiglu import swiglu_ffn_reference, swiglu_gate_up_reference
from tests.conftest import DEVICE, DTYPES, ON_GPU, assert_matches, randn

# (M, N, K): what each exercises
MATMUL_SHAPES = [
    pytest.param(1, 37, 19, id="T1-oddN-oddK"),
    pytest.param(33, 65, 129, id="all-odd-multi-tile"),
    pytest.param(70, 128, 64, id="even-K-fast-path"),
    pytest.param(200, 24, 1, id="K1"),
]

# (T, H, I)
FFN_SHAPES = [
    pytest.param(1, 32, 48, id="T1"),
    pytest.param(37, 72, 100, id="odd-T-H-I"),
    pytest.param(130, 64, 128, id="multi-tile"),
    pytest.param(3, 1, 1, id="H1-I1"),
]


def ffn_weights(hidden, intermediate, dtype):
    gate_up_proj = randn(2 * intermediate, hidden, dtype=dtype, scale=hidden ** -0.5)
    down_proj = randn(hidden, intermediate, dtype=dtype, scale=max(intermediate, 1) ** -0.5)
    return gate_up_proj, down_proj


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", MATMUL_SHAPES)
def test_matmul(M, N, K, dtype):
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype, scale=K ** -0.5)
    assert_matches(kernels.matmul(x, w), matmul_reference(x.double(), w.double()), dtype)


VARIANTS = {
    "pointer": dict(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2),
    "tma": dict(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2, tma=True),
    "tma-persistent": dict(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2, tma=True,
                           persistent=True),
    "tma-persistent-ws": dict(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2, tma=True,
                              persistent=True, warp_specialize=True),
}


@pytest.mark.parametrize("fuse_swiglu", [False, True], ids=["matmul", "swiglu"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(37, 72, 40), (5, 24, 8), (33, 65, 129)], ids=["tma-ok", "tiny", "misaligned"])
def test_kernel_variants(M, N, K, dtype, variant, fuse_swiglu):
    """Every kernel variant a config can pick; misaligned strides must fall back to the pointer kernel."""
    x, w = randn(M, K, dtype=dtype), randn(2 * N if fuse_swiglu else N, K, dtype=dtype, scale=K ** -0.5)
    ref = swiglu_gate_up_reference(x.double(), w.double()) if fuse_swiglu else x.double() @ w.double().T
    assert_matches(launch_matmul(x, w, fuse_swiglu=fuse_swiglu, cfg=VARIANTS[variant]), ref, dtype)


def test_matmul_strided_input():
    """A transposed (column-major) x is read through its strides, not copied."""
    x = randn(40, 33).T  # [33, 40], stride (1, 33)
    w = randn(20, 40)
    assert_matches(kernels.matmul(x, w), x.double() @ w.double().T, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, I", FFN_SHAPES)
def test_swiglu_ffn_and_parts(T, H, I, dtype):
    x = randn(T, H, dtype=dtype)
    gate_up_proj, down_proj = ffn_weights(H, I, dtype)
    x64, gu64, d64 = x.double(), gate_up_proj.double(), down_proj.double()

    assert_matches(kernels.swiglu_ffn(x, gate_up_proj, down_proj), swiglu_ffn_reference(x64, gu64, d64), dtype)
    assert_matches(kernels.swiglu_gate_up(x, gate_up_proj), swiglu_gate_up_reference(x64, gu64), dtype)
    assert_matches(kernels.ffn_gate(x, gate_up_proj), x64 @ gu64[:I].T, dtype)
    assert_matches(kernels.ffn_up(x, gate_up_proj), x64 @ gu64[I:].T, dtype)
    h = randn(T, I, dtype=dtype)
    assert_matches(kernels.ffn_down(h, down_proj), h.double() @ d64.T, dtype)


def test_swiglu_ffn_batched_leading_dims():
    x = randn(2, 5, 24)
    gate_up_proj, down_proj = ffn_weights(24, 40, torch.float32)
    out = kernels.swiglu_ffn(x, gate_up_proj, down_proj)
    assert_matches(out, swiglu_ffn_reference(x.double(), gate_up_proj.double(), down_proj.double()), torch.float32)


@pytest.mark.parametrize("T, H, I", [(0, 16, 32), (4, 16, 0)], ids=["T0", "I0"])
def test_swiglu_ffn_empty(T, H, I):
    x = randn(T, H)
    gate_up_proj, down_proj = ffn_weights(H, I, torch.float32)
    out = kernels.swiglu_ffn(x, gate_up_proj, down_proj)
    assert out.shape == (T, H)
    assert torch.equal(out, torch.zeros_like(out)), "an empty intermediate sums to zero"


def test_swiglu_ffn_gradients_match_reference():
    x = randn(9, 16).requires_grad_()
    gate_up_proj, down_proj = (w.requires_grad_() for w in ffn_weights(16, 24, torch.float32))
    grad_out = randn(9, 16)
    ours = torch.autograd.grad(kernels.swiglu_ffn(x, gate_up_proj, down_proj), (x, gate_up_proj, down_proj), grad_out)
    ref = torch.autograd.grad(swiglu_ffn_reference(x, gate_up_proj, down_proj), (x, gate_up_proj, down_proj), grad_out)
    for name, g, r in zip(("x", "gate_up_proj", "down_proj"), ours, ref):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), f"gradient of {name} differs"


def _ffn_args():
    x = randn(4, 8)
    gate_up_proj, down_proj = ffn_weights(8, 6, torch.float32)
    return x, gate_up_proj, down_proj


BAD_FFN_INPUT = [
    ("x", lambda x, gu, d: (x.tolist(), gu, d), TypeError),
    ("x", lambda x, gu, d: (x.long(), gu, d), TypeError),
    ("x", lambda x, gu, d: (x[0, 0], gu, d), ValueError),
    ("gate_up_proj", lambda x, gu, d: (x, gu.half(), d), TypeError),
    ("gate_up_proj", lambda x, gu, d: (x, gu[:, :5], d), ValueError),
    ("gate_up_proj", lambda x, gu, d: (x, gu[:11], d), ValueError),
    ("gate_up_proj", lambda x, gu, d: (x, gu[None], d), ValueError),
    ("down_proj", lambda x, gu, d: (x, gu, d[:7]), ValueError),
    ("down_proj", lambda x, gu, d: (x, gu, d[:, :5]), ValueError),
    ("down_proj", lambda x, gu, d: (x, gu, d.double()), TypeError),
]


@pytest.mark.parametrize("name, corrupt, error", BAD_FFN_INPUT,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_FFN_INPUT)])
def test_swiglu_ffn_bad_input(name, corrupt, error):
    with pytest.raises(error, match=name):
        kernels.swiglu_ffn(*corrupt(*_ffn_args()))


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA device to mix devices")
def test_matmul_mixed_devices():
    with pytest.raises(ValueError, match="weight"):
        kernels.matmul(randn(4, 8), torch.randn(3, 8))


def test_cpu_tensor_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setattr(kernels.validate, "INTERPRETER_AT_IMPORT", False)  # as if imported without it
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="x is on cpu; the Triton kernels need a CUDA tensor"):
        kernels.matmul(torch.randn(2, 4), torch.randn(3, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set after the import: too late for Triton
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 was set after `import kernels`"):
        kernels.matmul(torch.randn(2, 4), torch.randn(3, 4))


@pytest.mark.parametrize("fn", [kernels.ffn_gate, kernels.ffn_up, kernels.swiglu_gate_up])
def test_projection_bad_input(fn):
    x, gate_up_proj, _ = _ffn_args()
    with pytest.raises(ValueError, match="gate_up_proj"):
        fn(x, gate_up_proj[:, :3])
    with pytest.raises(TypeError, match="x"):
        fn(x.to(torch.int32), gate_up_proj)


@pytest.mark.parametrize("fn, name", [(kernels.matmul, "x"), (kernels.swiglu_gate_up, "x"), (kernels.ffn_down, "h")],
                         ids=["matmul", "swiglu_gate_up", "ffn_down"])
def test_meta_tensors_are_refused_naming_the_argument(fn, name):
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        fn(torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta"))


def test_ffn_down_bad_input():
    with pytest.raises(ValueError, match="down_proj"):
        kernels.ffn_down(randn(4, 6), randn(8, 5))


def test_tuner_buckets_are_reached_by_their_own_shapes():
    """``bench.tune_kernels`` times each bucket at a representative shape: the entry it writes must be the
    one the kernel picks at that shape, not shadowed by an earlier bucket's bounds."""
    from bench.tune_kernels import ATTENTION_BUCKETS, GEMM_BUCKETS
    from kernels.config import select_config
    for op, buckets in GEMM_BUCKETS.items():
        entries = [{"when": when, "config": {"bucket": i}} for i, (when, _, _) in enumerate(buckets)]
        for i, (_, (M, N, K), _) in enumerate(buckets):
            assert select_config(entries, m=M, n=N, k=K, elem_bytes=2)["bucket"] == i, (op, i)
    entries = [{"when": when, "config": {"bucket": i}} for i, (when, _, _) in enumerate(ATTENTION_BUCKETS)]
    for i, (_, (_, _, _, D), _) in enumerate(ATTENTION_BUCKETS):
        assert select_config(entries, head_dim=D)["bucket"] == i


def test_decode_buckets_are_timed_at_row_counts_each_bucket_serves():
    """A decode bucket's candidates are ranked over several row counts (one token as well as its widest):
    every count must select the bucket whose entry it tunes."""
    from bench.tune_kernels import GEMM_BUCKETS, timed_rows
    from kernels.config import select_config
    for op, buckets in GEMM_BUCKETS.items():
        entries = [{"when": when, "config": {"bucket": i}} for i, (when, _, _) in enumerate(buckets)]
        decode = [(i, when, shape) for i, (when, shape, _) in enumerate(buckets) if "max_m" in when]
        assert decode, op
        for i, when, (M, N, K) in decode:
            rows = timed_rows(when, (M, N, K))
            assert len(rows) > 1 and max(rows) == M, (op, rows)
            assert all(select_config(entries, m=m, n=N, k=K, elem_bytes=2)["bucket"] == i for m in rows), (op, i)
        assert all(timed_rows(when, shape) == (shape[0],) for when, shape, _ in buckets if "max_m" not in when)


@pytest.mark.parametrize("rows", [3, 37], ids=["narrow-3rows", "wide-37rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_candidates_match_the_reference(dtype, rows):
    """The decode tiles the tuner may pick: narrow ones for N <= 2048 (more programs a small N) at a few rows,
    32- and 64-row ones for 17-64 rows; odd M, N, K."""
    from bench.tune_kernels import NARROW_DECODE_GEMMS, WIDE_DECODE_GEMMS, gemm_candidates
    if ON_GPU and dtype == torch.float32 and rows >= 16:  # tuned entries serve 16-bit dtypes (max_elem_bytes 2)
        pytest.skip("fp32 tiles of 64 x 128 x 128 need more shared memory than an H100 has (OutOfResources)")
    tiles = NARROW_DECODE_GEMMS if rows < 16 else WIDE_DECODE_GEMMS
    x, w = randn(rows, 300, dtype=dtype), randn(40, 300, dtype=dtype, scale=300 ** -0.5)
    for cfg in gemm_candidates(tiles, [{}]):
        assert_matches(launch_matmul(x, w, cfg=cfg), matmul_reference(x.double(), w.double()), dtype)
