"""The command-line entry points and the atomic results writer."""
import json
import math
import os

import pytest
import torch

from bench import kernels as bench_kernels
from calibration import results as _results
from calibration import sweep as sweep_lib
from calibration.results import write_json_atomic
from calibration.sweep import LATENCY_SHAPES, SHAPE_SWEEP
from costmodel.ops import ModelDims
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
    from calibration.sweep import gpu_matches
    assert gpu_matches(requested, name) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has a GPU")
def test_calibrate_without_gpu_stops_with_a_clear_error(capsys):
    from bench import calibrate
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--gpu", "A100"])
    assert exit_info.value.code == 2
    assert "no NVIDIA GPU detected" in capsys.readouterr().err


def fill_paths(argv, tmp_path):
    """``argv`` with {dir} an existing directory and {file} a regular file (not JSON) under ``tmp_path``."""
    (tmp_path / "file").write_text("{ not json")
    return [arg.format(dir=tmp_path, file=tmp_path / "file") for arg in argv]


def refused(main, argv, capsys):
    """The usage error (exit code 2) ``main(argv)`` stops with, before any work."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top_k", "9"], "top_k"), (["--ops", "conv"], "--ops: unknown conv"), (["--ops", ""], "--ops"),
    (["--ops", "swiglu_ffn,swiglu_ffn"], "--ops: repeats swiglu_ffn"),
    (["--pressure_shares", "0.5,0.5"], "--pressure_shares: repeats 0.5"),
    (["--pressure_shares", "0.5,,0.9"], "none empty"), (["--pressure_shares", "1.5"], "--pressure_shares"),
    (["--window_s", "0.5"], "--window_s: must be a finite number of seconds >= 1"), (["--window_s", "nan"], "--window_s"),
    (["--window_s", "inf"], "--window_s"), (["--window_s", "-1"], "--window_s"),
    (["--trials", "0"], "--trials"), (["--trials", "-2"], "--trials"),
    (["--output", "{dir}"], "--output {dir} is a directory"), (["--output", "{file}/t.json"], "is not a directory"),
    (["--trace", "{dir}"], "--trace {dir} is a directory"),
], ids=["top_k", "unknown-op", "no-ops", "repeated-op", "repeated-share", "empty-share", "share-above-1", "window",
        "window-nan", "window-inf", "window-negative", "trials-0", "trials-negative", "output-dir", "output-in-file",
        "trace-dir"])
def test_calibrate_bad_arguments(argv, message, tmp_path, capsys):
    """Refused before the GPU check: on any machine, before a second of measuring."""
    from bench import calibrate
    argv, message = fill_paths(["--gpu", "H100", *argv], tmp_path), message.format(dir=tmp_path)
    assert message in refused(calibrate.main, argv, capsys)


def test_calibrate_counts_the_points_it_wrote():
    from bench.calibrate import point_count
    table = {"ops": {"ffn_gate": {"points": [{}, {}, {}], "note": "x"}, "rms_norm": {"points": [{}]}}}
    assert point_count(table) == 4


@pytest.mark.parametrize("gpu, message", [("../x", "short name"), ("h100", "use --gpu H100")])
def test_calibrate_gpu_names_a_table(gpu, message, capsys):
    from bench import calibrate
    assert message in refused(calibrate.main, ["--gpu", gpu], capsys)


def test_calibrate_keeps_the_old_table_when_the_new_one_fails_its_check(tmp_path):
    from calibration.priors import prior_table
    from calibration.sweep import rejected_path, write_table
    output = tmp_path / "H100.json"
    assert write_table(output, prior_table("H100")) is None
    before = output.read_text()
    bad = prior_table("H100")
    bad["ops"]["swiglu_ffn"]["points"][0]["energy_j"] = -1.0
    assert "energy_j" in write_table(output, bad)
    assert output.read_text() == before and rejected_path(output) == tmp_path / "H100.rejected.json"
    assert json.loads(rejected_path(output).read_text())["ops"]["swiglu_ffn"]["points"][0]["energy_j"] == -1.0


@pytest.mark.parametrize("argv, message", [
    (["--trials", "0"], "--trials"), (["--output", "{dir}"], "--output {dir} is a directory"),
    (["--output", "{file}/x.json"], "is not a directory"),
    (["--table", "{dir}"], "--table: cost table {dir} is not a file"),
    (["--table", "{file}"], "--table: cost table {file} is corrupt"),
    (["--table", "{dir}/none.json"], "--table: no cost table"),
    (["--gpu", "Z100"], "--gpu: no cost table"), (["--gpu", "A100"], "is a prior"),
    (["--shape", "d_model=30x"], "--shape: must be name=integer pairs"),
    (["--shape", "d_model=512,width=3"], "--shape: unknown fields width"),
    (["--shape", "d_model=512,d_model=1024"], "--shape: gives d_model twice"),
    (["--shape", "d_model=250,n_heads=4"], "--shape: d_model (250) must be a multiple of n_heads"),
    (["--shape", "d_model=4096,d_ff=14336,n_heads=32,seq_len=1024,num_experts=8,top_k=2,vocab_size=32000"],
     "the table measured ops at this shape"),
    (["--shape", "d_model=512", "--shapes", "none"], "--shape and --shapes none contradict"),
    (["--batches", "none", "--shapes", "none"], "--batches none with no shapes measures nothing"),
], ids=["trials", "output-dir", "output-in-file", "table-dir", "table-corrupt", "table-missing", "gpu-no-table",
        "prior", "shape-not-int", "shape-unknown-field", "shape-repeated-field", "shape-bad-dims", "shape-swept",
        "shape-and-none", "nothing"])
def test_kcm_accuracy_bad_arguments(argv, message, tmp_path, capsys):
    from bench import kcm_accuracy
    argv = fill_paths(["--gpu", "H100", *argv] if "--gpu" not in argv else argv, tmp_path)
    assert message.format(dir=tmp_path, file=tmp_path / "file") in refused(kcm_accuracy.main, argv, capsys)


@pytest.mark.parametrize("module, argv, message", [
    ("tune_moe", ["--shapes", "mixtral,bogus"], "--shapes: unknown bogus"), ("tune_moe", ["--shapes", ""], "--shapes"),
    ("tune_moe", ["--shapes", "mixtral,mixtral"], "--shapes: repeats mixtral"),
    ("profile_moe", ["--tokens", "0"], "--tokens"), ("profile_moe", ["--tokens", "-1"], "--tokens"),
    ("profile_moe", ["--repeats", "-5"], "--repeats"), ("profile_moe", ["--repeats", "0"], "--repeats"),
    ("kernels", ["--output", "{dir}"], "--output"), ("moe", ["--output", "{file}/x.json"], "--output"),
    ("moe", ["--shapes", ""], "--shapes"),
])
def test_gpu_tools_refuse_bad_arguments_first(module, argv, message, tmp_path, capsys):
    """Before the no-GPU check, so a CPU machine sees the argument error too."""
    main = __import__(f"bench.{module}", fromlist=["main"]).main
    assert message in refused(main, fill_paths(argv, tmp_path), capsys)


@pytest.mark.parametrize("op", __import__("costmodel").OPS)
def test_calibrate_runs_every_op_on_our_kernels(op):
    """Each op the sweep measures is a runnable call of our kernels (tiny shapes, on the test device)."""
    from calibration.op_calls import op_callable
    from costmodel import ModelDims
    from costmodel.ops import FP8_OPS
    from tests.test_fp8_experts import FP8_GPU
    dims = ModelDims(d_model=64, d_ff=48, n_heads=2, seq_len=16, num_experts=4, top_k=2)
    if op in FP8_OPS and not FP8_GPU:
        pytest.skip("the FP8 ops need a CUDA GPU with FP8 (test_fp8_experts checks their refusal elsewhere)")
    out = op_callable(op, 3, dims, device=DEVICE, dtype=torch.bfloat16 if op in FP8_OPS else torch.float32)()
    tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if t.is_floating_point()]
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)  # float(): FP8 has no isfinite


def test_kcm_accuracy_summary_maths():
    from bench.harness.accuracy import summarise
    from bench.kcm_accuracy import summaries
    rows = [{"predicted_energy_j": p, "measured_energy_j": 1.0} for p in (1.0, 1.02, 0.95, 1.1, 1.01)]
    summary = summarise(rows, "energy_j")
    assert summary["median_ape_pct"] == pytest.approx(2.0) and summary["p90_ape_pct"] == pytest.approx(10.0)
    assert summary["median_signed_pct"] == pytest.approx(1.0) and summary["n"] == 5
    kernel = [{"held_out": kind, "source": source, "predicted_energy_j": p, "measured_energy_j": 1.0,
               "predicted_latency_ms": 1.0, "measured_latency_ms": 1.0}
              for kind, source, p in (("batch", "interpolated", 1.1), ("batch", "interpolated", 1.1),
                                      ("shape", "modelled", 0.8), ("shape", "interpolated", 1.0))]
    forward = [{"mode": "graph", "predicted_energy_j": 1.0, "measured_energy_j": 1.0, "predicted_latency_ms": 1.0,
                "measured_latency_ms": 1.0}]
    report = summaries(kernel, forward)
    assert report["batch_energy"]["median_signed_pct"] == pytest.approx(10.0) and report["batch_energy"]["n"] == 2
    assert report["shape_energy"]["n"] == 2 and report["energy"]["n"] == 4
    # a held-out shape's op costed from a measured shape's points (same d_model) is not the model alone
    assert report["shape_modelled_energy"]["median_signed_pct"] == pytest.approx(-20.0)
    assert report["shape_modelled_energy"]["n"] == 1
    assert report["forward_energy"]["n"] == 1
    kernels_only = summaries(kernel, [])  # --forwards none: no forward summary, rather than a crash
    assert "forward_energy" not in kernels_only and kernels_only["energy"] == report["energy"]


def test_calibrate_writes_to_the_user_table_folder_by_default(tmp_path, monkeypatch):
    """Never into the installed package: a reinstall keeps the calibration, the package its tables."""
    from bench import calibrate
    from costmodel.table import TABLES_ENV
    monkeypatch.setenv(TABLES_ENV, str(tmp_path / "tables"))
    _, args = calibrate.parse_args(["--gpu", "H100"])
    assert args.output == tmp_path / "tables" / "H100.json"


def test_calibrate_resume_is_refused_without_a_matching_partial_sweep(tmp_path, capsys):
    """--resume needs the partial file of a sweep with the same settings: checked before any measuring."""
    from bench import calibrate
    from calibration.results import write_json_atomic
    output = tmp_path / "H100.json"
    argv = ["--gpu", "H100", "--output", str(output), "--ops", "ffn_gate", "--resume"]
    assert "--resume: no interrupted sweep" in refused(calibrate.main, argv, capsys)
    partial = sweep_lib.partial_path(output)
    partial.write_text("{ not json")
    assert "is corrupt" in refused(calibrate.main, argv, capsys)
    write_json_atomic(partial, {"settings": {}})
    assert "is not a partial sweep" in refused(calibrate.main, argv, capsys)
    _, args = calibrate.parse_args(argv[:-1] + ["--trials", "3"])
    write_json_atomic(partial, args.state)
    err = refused(calibrate.main, argv, capsys)
    assert "other trials (trials=3)" in err, err


def test_calibrate_resume_on_another_board_is_refused(tmp_path, capsys):
    """A sweep begun on one board is not continued on another (their energy counters differ);
    the same board, or a partial sweep that never recorded one, continues."""
    import argparse
    from bench import calibrate
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        calibrate.check_same_board(parser, {"boards": ["GPU-a"]}, "GPU-b")
    err = capsys.readouterr().err
    assert "board GPU-a" in err and "GPU-b" in err and "without --resume" in err, err
    for state, board in (({"boards": ["GPU-a"]}, "GPU-a"), ({}, "GPU-b"), ({"boards": [None]}, "GPU-b"),
                         ({"boards": ["GPU-a"]}, None)):
        calibrate.check_same_board(parser, state, board)


class _Sampler:
    samples = []

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_calibrate_sweep_resumes_where_it_was_cut(tmp_path, monkeypatch):
    """A sweep cut after 3 points keeps them in the partial file; --resume measures only the rest,
    and the two runs' points together are the whole plan (the table's dims, metered at the energy
    batch sizes, then the sweep shapes, each metered, then the latency shapes, none metered), each once."""
    from bench import calibrate
    measured = []

    def fake_point(op, batch_size, dims, meter, idle_power_w, window_s, trials, pressure=None):
        if len(measured) == 3 and not resumed:
            raise KeyboardInterrupt
        measured.append((op, dims, batch_size, trials))
        return {"batch_size": batch_size, "latency_ms": 1.0 + batch_size, "energy_j": 0.1}, None

    monkeypatch.setattr(sweep_lib, "sweep_point", fake_point)
    monkeypatch.setattr(sweep_lib, "BackgroundSampler", _Sampler)
    argv = ["--gpu", "H100", "--output", str(tmp_path / "H100.json"), "--ops", "ffn_gate,ffn_up",
            "--pressure_shares", ""]
    _, args = calibrate.parse_args(argv)
    args.state["constants"] = {"idle_power_w": 70.0}
    save = lambda state: write_json_atomic(sweep_lib.partial_path(args.output), state)  # noqa: E731
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        sweep_lib.sweep(args.settings, None, args.state, save)
    assert [(m[0], m[2]) for m in measured] == [("ffn_gate", 1), ("ffn_gate", 4), ("ffn_gate", 16)]
    resumed = True
    _, again = calibrate.parse_args(argv + ["--resume"])
    assert again.state["points"]["ffn_gate"] == [{"batch_size": b, "latency_ms": 1.0 + b, "energy_j": 0.1}
                                                 for b in (1, 4, 16)]
    sweep_lib.sweep(again.settings, None, again.state, save)
    plan = sweep_lib.sweep_plan(again.settings)
    assert sorted(measured, key=str) == sorted(plan, key=str) and len(measured) == len(plan), "every point once"
    shapes = SHAPE_SWEEP + LATENCY_SHAPES
    shape_batches = sorted(sweep_lib.SHAPE_TOKEN_BATCHES + sweep_lib.SHAPE_LATENCY_TOKEN_BATCHES)
    assert len(plan) == 2 * (len(sweep_lib.TOKEN_BATCHES) + len(shapes) * len(shape_batches))
    metered = {(dims, b) for op, dims, b, trials in plan if trials}
    assert metered == ({(dims, b) for dims in SHAPE_SWEEP for b in sweep_lib.SHAPE_TOKEN_BATCHES}
                       | {(again.settings.dims, b) for b in sweep_lib.ENERGY_TOKEN_BATCHES})
    assert set(sweep_lib.ENERGY_TOKEN_BATCHES) < set(sweep_lib.TOKEN_BATCHES)
    at_table_dims = [p for p in again.state["points"]["ffn_up"] if "dims" not in p]
    assert [p["batch_size"] for p in at_table_dims] == list(sweep_lib.TOKEN_BATCHES)
    shaped = [p for p in again.state["points"]["ffn_up"] if "dims" in p]
    assert [ModelDims(**p["dims"]) for p in shaped[::len(shape_batches)]] == list(shapes)
    assert [p["batch_size"] for p in shaped[:len(shape_batches)]] == shape_batches


def test_calibrate_shapes_none_sweeps_the_table_dims_only(tmp_path):
    from bench import calibrate
    _, args = calibrate.parse_args(["--gpu", "H100", "--output", str(tmp_path / "H100.json"), "--ops", "ffn_gate",
                                    "--shapes", "none"])
    assert args.settings.shapes == () == args.settings.latency_shapes
    assert len(sweep_lib.sweep_plan(args.settings)) == len(sweep_lib.TOKEN_BATCHES)


def test_calibrate_table_of_a_short_resumed_run_passes_its_check(tmp_path):
    """Too few samples to fit the thermal model: the table says so instead of fitting noise, and
    still passes check_table; it records the runs and keeps the first run's constants."""
    from bench import calibrate
    from costmodel.table import check_table
    _, args = calibrate.parse_args(["--gpu", "H100", "--output", str(tmp_path / "H100.json"), "--ops", "ffn_gate",
                                    "--pressure_shares", ""])
    state = args.state | {"runs": 2, "constants": {"idle_power_w": 70.0, "gap_power_w": 90.0, "peak_flops": 1e15,
                                                   "hbm_bytes_per_s": 3e12}, "boards": ["GPU-test", "GPU-test"]}
    state["points"] = {"ffn_gate": [{"batch_size": b, "latency_ms": 0.01 * b, "energy_j": 0.001 * b, "flops": 1.0,
                                     "bytes": 1.0, "memory_gb": 1e-9} for b in (16, 1, 4)]}

    class Meter:
        def driver_version(self):
            return "test"

        def uuid(self):
            return "GPU-test"

    table = sweep_lib.build_table(args.settings, state, Meter(), "NVIDIA H100 80GB HBM3", [], 12.0)
    check_table(args.output, table)
    assert table["thermal"] is None and "without --resume" in table["thermal_missing_reason"]
    assert table["resumed"]["runs"] == 2 and table["idle_power_w"] == 70.0
    assert table["resumed"]["boards"] == ["GPU-test", "GPU-test"]
    assert [p["batch_size"] for p in table["ops"]["ffn_gate"]["points"]] == [1, 4, 16]


def _stub_point(batch_size):
    return {"batch_size": batch_size, "latency_ms": 0.01 * batch_size, "energy_j": 0.001 * batch_size, "flops": 1.0,
            "bytes": 1.0, "memory_gb": 1e-9}


def _stub_calibration_gpu(monkeypatch, calibrate, sweep_point):
    """``bench.calibrate`` with its GPU parts stubbed: a meter of one test board, fixed constants,
    ``sweep_point`` for every point."""
    class Meter:
        def __init__(self, index):
            pass

        def name(self):
            return "NVIDIA H100 80GB HBM3"

        def driver_version(self):
            return "test"

        def uuid(self):
            return "GPU-test"

        def temperature_thresholds_c(self):
            return {"slowdown": 89, "shutdown": 95}

    monkeypatch.setattr(calibrate, "GpuMeter", Meter)
    monkeypatch.setattr(calibrate, "check_gpu", lambda parser, gpu, meter: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(sweep_lib, "measure_constants", lambda meter: {
        "idle_power_w": 70.0, "gap_power_w": 90.0, "peak_flops": 1e15, "hbm_bytes_per_s": 3e12})
    monkeypatch.setattr(sweep_lib, "BackgroundSampler", _Sampler)
    monkeypatch.setattr(sweep_lib, "sweep_point", sweep_point)


def test_calibrate_main_writes_the_table_and_removes_the_partial(tmp_path, monkeypatch, capsys):
    """The whole command with the GPU parts stubbed: constants once, every point, the table checked
    and written, the partial sweep gone."""
    from bench import calibrate
    _stub_calibration_gpu(monkeypatch, calibrate, lambda op, b, *a: (_stub_point(b), None))
    output = tmp_path / "H100.json"
    assert calibrate.main(["--gpu", "H100", "--output", str(output), "--ops", "ffn_gate", "--pressure_shares", ""]) == 0
    table = json.loads(output.read_text())
    points = table["ops"]["ffn_gate"]["points"]
    shapes = len(SHAPE_SWEEP) + len(LATENCY_SHAPES)
    shape_batches = len(sweep_lib.SHAPE_TOKEN_BATCHES) + len(sweep_lib.SHAPE_LATENCY_TOKEN_BATCHES)
    assert len(points) == len(sweep_lib.TOKEN_BATCHES) + shapes * shape_batches
    assert [p["batch_size"] for p in points if "dims" not in p] == list(sweep_lib.TOKEN_BATCHES)
    # without CUDA no SM count or configs, and the table says why; on a GPU they are that GPU's
    assert "resumed" not in table and ("device_facts_missing_reason" in table) == (not torch.cuda.is_available())
    assert not sweep_lib.partial_path(output).exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [("tpu", "--device must be auto, cpu, cuda or cuda:N"),
                                           ("cuda:x", "--device must be auto, cpu, cuda or cuda:N"),
                                           ("cuda:99", "GPU 99 is not visible" if torch.cuda.is_available()
                                            else "no CUDA device here")])
def test_resolve_device_refuses_bad_devices(name, message, capsys):
    import argparse

    from bench._cli import resolve_device
    parser = argparse.ArgumentParser(prog="test")
    with pytest.raises(SystemExit):
        resolve_device(parser, name)
    assert message in capsys.readouterr().err
    assert resolve_device(parser, "cpu") == torch.device("cpu")


def test_calibrate_sweeps_fp8_ops_only_where_the_gpu_has_fp8(monkeypatch, capsys):
    from bench import calibrate
    from costmodel.ops import FP8_OPS, OPS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (8, 0))  # an A100
    _, args = calibrate.parse_args(["--gpu", "A100"])
    assert args.settings.ops == tuple(op for op in OPS if op not in FP8_OPS)
    assert "this GPU has no FP8" in refused(calibrate.main, ["--gpu", "A100", "--ops", "ffn_gate,quantize_fp8"],
                                            capsys)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    _, args = calibrate.parse_args(["--gpu", "H100"])
    assert args.settings.ops == OPS


def test_a_sweep_of_some_ops_keeps_the_others_of_the_same_gpu_and_dims(tmp_path):
    """``--ops`` re-measures those ops; the table it replaces keeps the rest when it measured the same card and dims."""
    from calibration.priors import prior_table
    from calibration.results import write_json_atomic
    output = tmp_path / "H100.json"
    old = prior_table("H100") | {"source": "measured", "gpu_name": "NVIDIA H100 80GB HBM3",
                                 "provenance": {"commit": "old"}}
    write_json_atomic(output, old)
    settings = sweep_lib.SweepSettings("H100", sweep_lib.ModelDims(), ("quantize_fp8",), output)
    new = {"gpu_name": old["gpu_name"], "dims": old["dims"], "memory_pressure": None,
           "ops": {"quantize_fp8": {"points": []}}}
    merged = sweep_lib.keep_other_ops(json.loads(json.dumps(new)), settings)
    assert set(merged["ops"]) == set(old["ops"]) and merged["ops"]["quantize_fp8"] == {"points": []}
    assert merged["ops"]["ffn_gate"] == old["ops"]["ffn_gate"]
    assert merged["kept_ops"]["provenance"] == {"commit": "old"} and "quantize_fp8" not in merged["kept_ops"]["ops"]
    for change in ({"gpu_name": "NVIDIA H200"}, {"dims": {**old["dims"], "d_model": 512}}):
        assert "kept_ops" not in sweep_lib.keep_other_ops(json.loads(json.dumps(new | change)), settings)
    write_json_atomic(output, old | {"source": "prior"})
    assert "kept_ops" not in sweep_lib.keep_other_ops(json.loads(json.dumps(new)), settings), "priors are not kept"


def test_a_resumed_sweep_lists_each_point_that_still_does_not_fit_once(tmp_path, monkeypatch):
    """A run cut after two points ran out of memory, resumed: the one that fits now is measured and leaves
    the list, the one that still does not fit is listed once."""
    from bench import calibrate

    class Cut(Exception):
        pass

    def first_run(op, b, dims, *args):
        if dims == LATENCY_SHAPES[-1]:
            if b >= 16:
                raise Cut("the device's call limit")
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return _stub_point(b), None

    def resumed_run(op, b, dims, *args):
        if dims == LATENCY_SHAPES[-1] and b == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return _stub_point(b), None
    output = tmp_path / "H100.json"
    argv = ["--gpu", "H100", "--output", str(output), "--ops", "ffn_gate", "--pressure_shares", ""]
    _stub_calibration_gpu(monkeypatch, calibrate, first_run)
    with pytest.raises(Cut):
        calibrate.main(argv)
    assert len(json.loads(sweep_lib.partial_path(output).read_text())["out_of_memory"]) == 2
    _stub_calibration_gpu(monkeypatch, calibrate, resumed_run)
    assert calibrate.main(argv + ["--resume"]) == 0
    table = json.loads(output.read_text())
    assert [(p["batch_size"], ModelDims(**p["dims"])) for p in table["out_of_memory_points"]["points"]] == [
        (1, LATENCY_SHAPES[-1])]
    assert 4 in [p["batch_size"] for p in table["ops"]["ffn_gate"]["points"]
                 if ModelDims(**p.get("dims", {})) == LATENCY_SHAPES[-1]]


def _first_order_card(seconds):
    """NVML readings at 10 Hz of a card 30 °C + 0.03 °C/W above nothing, tau 0.5 s, power stepping 100 / 400 W."""
    from calibration.nvml_meter import GpuReading
    readings, temp_c = [], 33.0
    for i in range(round(seconds * 10)):
        power_w = 400.0 if (i // 20) % 2 else 100.0
        temp_c += (30.0 + 0.03 * power_w - temp_c) * (1 - math.exp(-0.1 / 0.5))
        readings.append(GpuReading(time_s=100.0 + 0.1 * i, power_instant_w=power_w, temperature_c=temp_c,
                                   sm_clock_mhz=1980, clock_event_reasons=0))
    return readings


def test_a_resumed_sweep_fits_its_thermal_model_to_the_longest_run(tmp_path, monkeypatch):
    """The first run (60 s of readings) is cut; the resumed one has 1 s: the table's thermal fit and its trace
    are the first run's, and the timelines file goes once the table is written."""
    from bench import calibrate

    class Cut(Exception):
        pass

    class Sampler(_Sampler):
        interval_s = 0.1

        def __init__(self, *args, **kwargs):
            self.samples = _first_order_card(1.0 if resumed else 60.0)

    def point(op, b, *args):
        if not resumed and b > 4:
            raise Cut("the device's call limit")
        return _stub_point(b), None
    _stub_calibration_gpu(monkeypatch, calibrate, point)
    monkeypatch.setattr(sweep_lib, "BackgroundSampler", Sampler)
    output, trace = tmp_path / "H100.json", tmp_path / "trace.json"
    argv = ["--gpu", "H100", "--output", str(output), "--ops", "ffn_gate", "--pressure_shares", "", "--shapes",
            "none", "--trace", str(trace)]
    resumed = False
    with pytest.raises(Cut):
        calibrate.main(argv)
    resumed = True
    assert calibrate.main(argv + ["--resume"]) == 0
    table = json.loads(output.read_text())
    assert table["thermal"]["n_samples"] == 600 and "longest timeline" in table["resumed"]["note"]
    # the fit's continuous model against the card's discrete steps: near, not exact
    assert table["thermal"]["resistance_c_per_w"] == pytest.approx(0.03, rel=0.15)
    written = json.loads(trace.read_text())
    assert written["run"] == 1 and len(written["readings"]) == 600
    assert not sweep_lib.partial_path(output).exists() and not (tmp_path / "H100.timeline.json").exists()


def test_calibrate_records_shapes_that_do_not_fit_and_goes_on(tmp_path, monkeypatch):
    """A point that runs out of GPU memory (the largest latency shape on a small card) is recorded
    in the table's ``out_of_memory_points`` and skipped; every other point is measured."""
    from bench import calibrate

    def point(op, b, dims, *args):
        if dims == LATENCY_SHAPES[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return _stub_point(b), None
    _stub_calibration_gpu(monkeypatch, calibrate, point)
    output = tmp_path / "H100.json"
    assert calibrate.main(["--gpu", "H100", "--output", str(output), "--ops", "ffn_gate", "--pressure_shares", ""]) == 0
    table = json.loads(output.read_text())
    skipped = table["out_of_memory_points"]["points"]
    assert [p["batch_size"] for p in skipped] == sorted(sweep_lib.SHAPE_TOKEN_BATCHES
                                                        + sweep_lib.SHAPE_LATENCY_TOKEN_BATCHES)
    assert all(ModelDims(**p["dims"]) == LATENCY_SHAPES[-1] and p["op"] == "ffn_gate" for p in skipped)
    measured = {ModelDims(**p["dims"]) for p in table["ops"]["ffn_gate"]["points"] if "dims" in p}
    assert measured == set(SHAPE_SWEEP + LATENCY_SHAPES[:-1])


@pytest.mark.parametrize("ops", ["conv", "", "matmul,matmul", "matmul,,attention2"])
def test_tune_kernels_refuses_bad_ops_before_any_work(ops, capsys):
    from bench import tune_kernels
    assert "--ops: want distinct ops" in refused(tune_kernels.main, ["--ops", ops], capsys)


def test_tune_moe_keeps_the_entries_of_shapes_it_did_not_retune():
    """Re-tuning Qwen3 must not drop Mixtral's entries and records (a --shapes qwen3 run once wrote a file
    with Qwen3's alone), and says whose run the kept ones come from."""
    from bench import moe_cases
    from bench.harness.tuning import kept_shapes
    mixtral, qwen3 = moe_cases.SHAPES["mixtral"], moe_cases.SHAPES["qwen3"]

    def pinned(shape, n):
        return {"when": {"min_e": shape.E, "max_e": shape.E, "min_i": shape.I, "max_i": shape.I}, "config": {"n": n}}
    earlier = {"entries": [pinned(mixtral, 1), pinned(qwen3, 2), {"when": {"max_slots_per_expert": 16}, "config": {}}],
               "tuned": {"provenance": {"commit": "abc"}, "buckets": [{"shape": "mixtral", "T": 1},
                                                                     {"shape": "qwen3", "T": 1}]}}
    entries, measured, kept = kept_shapes(earlier, [qwen3])
    assert entries == [pinned(mixtral, 1)] and measured == [{"shape": "mixtral", "T": 1}]
    assert kept == {"shapes": ["mixtral"], "provenance": {"commit": "abc"}}
    assert kept_shapes(earlier, [qwen3, mixtral]) == ([], [], None)
    assert kept_shapes(None, [qwen3]) == ([], [], None)
