"""``python -m bench.compile_decode``: torch.compile of a patched HF Qwen3-MoE decode step, at CPU sizes."""
import json

import pytest

from tests.conftest import ON_GPU, usage_error

transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
if not hasattr(transformers, "Qwen3MoeForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3-MoE", allow_module_level=True)

from bench import compile_decode  # noqa: E402


@pytest.mark.skipif(ON_GPU, reason="the CPU sizes; on a GPU the command is run at its GPU defaults")
def test_compiled_decode_matches_eager_and_reports_null_times(tmp_path, capsys):
    output = tmp_path / "compile_decode.json"
    assert compile_decode.main(["--decode", "1,3", "--num_layers", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["patched_blocks"] == 1 and report["shape"] == "tiny"
    assert "no CUDA device" in report["time_null_reason"]
    assert [d["batch_size"] for d in report["decode"]] == [1, 3]
    for decode in report["decode"]:
        assert list(decode["ways"]) == ["eager", "compile"]  # no CUDA graphs on a CPU
        assert decode["ways"]["compile"]["rel_error_vs_eager"] < 1e-5
        assert all(way["ms"] is None for way in decode["ways"].values())
        assert decode["target_met"] is None and decode["ratio_to_graph"] is None
    assert "reduce-overhead <= 1.1x our graph: not timed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--decode", "0"], "--decode"),
    (["--num_layers", "-1"], "--num_layers"),
    (["--output", "{dir}"], "--output"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    err, _ = usage_error(compile_decode.parse_args, argv, tmp_path, capsys)
    assert message in err
