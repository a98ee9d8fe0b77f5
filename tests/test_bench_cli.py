"""The command-line entry points and the atomic results writer."""
import json

import pytest
import torch

from bench import _results
from bench import kernels as bench_kernels
from tests.conftest import REL_TOL


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
