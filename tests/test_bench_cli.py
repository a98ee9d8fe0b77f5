"""The command-line entry points and the atomic results writer."""
import json
import os

import pytest
import torch

from bench.harness import results as _results
from bench import kernels as bench_kernels
from tests.conftest import DEVICE, REL_TOL


def test_bench_kernels_on_cpu_reports_correctness_and_null_times(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--output", str(out), "--only", "H256" if torch.cuda.is_available() else "swiglu"]) == 0
    data = json.loads(out.read_text())
    assert data["provenance"]["torch"] and data["rows"]
    for row in data["rows"]:
        assert row["rel_error_vs_peer"] < REL_TOL[getattr(torch, row["dtype"])]
        if data["provenance"]["gpu"] is None:
            assert row["ours_ms"] is None and "no CUDA device" in row["time_null_reason"]
    assert "swiglu_ffn" in capsys.readouterr().out


def test_write_json_atomic_keeps_old_file_when_interrupted(tmp_path):
    path = tmp_path / "r.json"
    _results.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        _results.write_json_atomic(path, {"a": object()})  # fails mid-dump
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path], "no temp file left behind"
    old_umask = os.umask(0o022)
    try:
        _results.write_json_atomic(path, {"a": 2})
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644, "as readable as a file written with open()"


@pytest.mark.parametrize("requested, name, expected", [
    ("A100", "NVIDIA A100-SXM4-80GB", True), ("H100", "NVIDIA H100 80GB HBM3", True),
    ("h100", "NVIDIA H100 80GB HBM3", True), ("H10", "NVIDIA H100 80GB HBM3", False),
    ("H100", "NVIDIA H200", False), ("A10", "NVIDIA A100-SXM4-80GB", False),
])
def test_calibrate_gpu_name_matching(requested, name, expected):
    from bench.calibrate import gpu_matches
    assert gpu_matches(requested, name) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has a GPU")
def test_calibrate_without_gpu_stops_with_a_clear_error(capsys):
    from bench import calibrate
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--gpu", "A100"])
    assert exit_info.value.code == 2
    assert "no NVIDIA GPU detected" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "A100", "--top_k", "9"], "top_k"), (["--gpu", "A100", "--ops", "conv"], "unknown ops"),
    (["--gpu", "../x"], "short name"),
])
def test_calibrate_bad_arguments(argv, message, capsys):
    from bench import calibrate
    with pytest.raises(SystemExit):
        calibrate.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("op", __import__("costmodel").OPS)
def test_calibrate_runs_every_op_on_our_kernels(op):
    """Each op the sweep measures is a runnable call of our kernels (tiny shapes, on the test device)."""
    from bench.calibrate import op_callable
    from costmodel import ModelDims
    dims = ModelDims(d_model=64, d_ff=48, n_heads=2, seq_len=16, num_experts=4, top_k=2)
    out = op_callable(op, 3, dims, device=DEVICE, dtype=torch.float32)()
    tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_kcm_accuracy_summary_maths():
    from bench.kcm_accuracy import summarise
    rows = [{"predicted_energy_j": p, "measured_energy_j": 1.0} for p in (1.0, 1.02, 0.95, 1.1, 1.01)]
    summary = summarise(rows, "energy_j")
    assert summary["median_ape_pct"] == pytest.approx(2.0) and summary["p90_ape_pct"] == pytest.approx(10.0)
    assert summary["n"] == 5
