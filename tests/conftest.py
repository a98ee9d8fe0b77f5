"""Shared fixtures: the device under test, dtypes with their tolerances, and poisoned outputs."""
import zlib

import pytest
import torch

from costmodel.table import TABLES_ENV

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# ‖out − ref‖ / ‖ref‖ against a float64 reference. fp32 products are exact ("ieee") in our kernels.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
        not ON_GPU, reason="bf16 loads give NaN/garbage in the Triton interpreter; bf16 is verified on the GPU")),
]

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (none found)")


@pytest.fixture(autouse=True)
def own_user_tables(tmp_path_factory, monkeypatch):
    """An empty user table folder per test: a developer's own calibrations never shadow the packaged
    tables the tests read, and no test writes into the real one."""
    monkeypatch.setenv(TABLES_ENV, str(tmp_path_factory.mktemp("user_tables")))


@pytest.fixture(autouse=True)
def seeded_rng(request):
    """Each test draws the same random data whatever ran before it (and whichever tests are selected)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def poison_fresh_allocations(monkeypatch):
    """Fill every new float tensor from torch.empty/empty_like with NaN, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t  # no branch on the size: traceable

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(empty_like(*a, **kw)))


def rel_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (0 for two empty tensors)."""
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_matches(out, ref, dtype):
    """``out`` has ``ref``'s shape, no NaN/Inf (poison caught), and a relative error within ``dtype``'s tolerance."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == dtype, f"dtype {out.dtype} != {dtype}"
    assert torch.isfinite(out).all(), "output has NaN/Inf: unwritten (poisoned) or overflowed elements"
    err = rel_error(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]:.0e} for {dtype}"


def randn(*shape, dtype=torch.float32, scale=1.0, generator=None):
    """Random normal data on the device under test (never zeros)."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(DEVICE, dtype)


def usage_error(parse_args, argv, tmp_path, capsys, file_text=""):
    """The stderr of ``parse_args`` refusing ``argv`` with exit code 2; ``{dir}`` and ``{file}`` in
    ``argv`` name a directory and a file (holding ``file_text``) under ``tmp_path``. Returns
    (stderr, paths) so the caller can format its expected message with the same paths."""
    (tmp_path / "file").write_text(file_text)
    paths = {"dir": tmp_path, "file": tmp_path / "file"}
    with pytest.raises(SystemExit) as exit_info:
        parse_args([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err, paths
