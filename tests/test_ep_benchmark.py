"""bench.ep_benchmark on 2 CPU processes (gloo), and the multi-node SLURM script's header and commands."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from bench import ep_benchmark
from tests.cluster_scripts import REPO, directives, dry_run, modules_called
from tests.conftest import ON_GPU, usage_error

SCRIPT = "bench/run_ep.slurm"


@pytest.mark.skipif(ON_GPU, reason="the CPU (gloo, interpreter) run; on a CUDA machine run the benchmark on GPUs")
def test_two_process_cpu_run(tmp_path):
    output = tmp_path / "ep.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bench.ep_benchmark", "--device", "cpu", "--shape", "tiny", "--tokens_per_gpu", "24",
               "--repeats", "1", "--calls_per_batch", "2", "--chunks", "1,3", "--output", str(output)]  # every mode
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weak-scaling efficiency" in done.stdout
    report = json.loads(output.read_text())
    assert report["world_size"] == 2 and report["provenance"]["commit"]
    results = report["results"]
    assert results["correctness"]["rel_l2_error_max_over_ranks"] <= results["correctness"]["tolerance"] == 1e-5
    for name in ("single_gpu", "ep_exact_chunks1", "ep_exact_chunks3", "ep_fixed_chunks1", "ep_fixed_chunks3"):
        entry = results[name]
        assert entry["latency_ms"] > 0 and entry["tokens_per_s"] > 0
        assert entry["energy_j_per_token"] is None and entry["energy_reason"]  # no NVML here: null, with why
        assert name == "single_gpu" or entry["rel_l2_error_vs_single_gpu"] <= 1e-5
    for name in ("single_gpu_graph", "ep_fixed_graph_chunks1"):
        assert "GPU" in results[name]["skipped"]
    traffic = results["ep_exact_chunks1"]["bytes_per_token"]
    assert traffic == results["ep_exact_chunks3"]["bytes_per_token"]
    fixed = results["ep_fixed_chunks1"]["bytes_per_token"]  # every row to the other rank: 24 rows of 32 floats
    assert fixed == {"dispatch": 32 * 4 + 2 * 2 * 4, "combine": 32 * 4, "ranks_per_token": 2}
    assert results["weak_scaling"]["best_ep"] in ("ep_exact_chunks1", "ep_exact_chunks3", "ep_fixed_chunks1",
                                                  "ep_fixed_chunks3")
    assert results["weak_scaling"]["best_single_gpu"] == "single_gpu" and results["weak_scaling"]["graph_efficiency"] is None
    for q in ("10", "100"):  # the committed H100 table has a measured 2-GPU all_to_all curve
        aware = results[f"ep_energy_aware_q{q}"]
        assert aware["bytes_per_token"]["dispatch"] <= traffic["dispatch"] and aware["costs"]["communication_costs"]
        assert 0 <= aware["rerouted_fraction"] <= 1 and aware["output_change_rel_l2_vs_topk"] >= 0
    assert 0 < traffic["combine"] < traffic["dispatch"] and 1 <= traffic["ranks_per_token"] <= 2
    assert results["weak_scaling"]["efficiency"] == results["weak_scaling"]["eager_efficiency"] > 0


def test_slurm_header():
    options = dict(re.fullmatch(r"--([\w-]+)=(.+)", d).groups() for d in directives(SCRIPT, "#SBATCH"))
    assert int(options["nodes"]) >= 2 and options["gres"].startswith("gpu:")
    assert re.fullmatch(r"\d\d:\d\d:\d\d", options["time"]) and options["ntasks-per-node"] == "1"


def test_slurm_dry_run(tmp_path, monkeypatch):
    """One torchrun per node through srun, rendezvous at the first node; each module's flags parse."""
    env = dict(os.environ, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4",
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu[01-02]")
    calls = dry_run(SCRIPT, tmp_path, env, passthrough=("srun",), printing={"scontrol": "gpu01\ngpu02"})
    for call in calls:
        assert call[0] == "torchrun" and call[call.index("--nnodes") + 1] == "2"
        assert call[call.index("--nproc_per_node") + 1] == "4" and call[call.index("--rdzv_endpoint") + 1] == "gpu01:29500"
    modules = modules_called(calls)
    assert list(modules) == ["bench.calibrate_comm", "bench.ep_benchmark"]
    table = modules["bench.ep_benchmark"][modules["bench.ep_benchmark"].index("--cost_table") + 1]
    assert table == modules["bench.calibrate_comm"][modules["bench.calibrate_comm"].index("--output") + 1]
    assert (tmp_path / "results" / "ep_77").is_dir()
    monkeypatch.chdir(tmp_path)  # the job's directory, where calibrate_comm has written the table
    shutil.copy(REPO / "calibration" / "tables" / "H100.json", table)
    args = ep_benchmark.parse_args(modules["bench.ep_benchmark"])
    assert args.shape.name == "qwen3" and args.tokens_per_gpu == 8192


@pytest.mark.parametrize("flags, name", [
    (["--tokens_per_gpu", "0"], "--tokens_per_gpu"), (["--chunks", "1,x"], "--chunks"), (["--chunks", "0"], "--chunks"),
    (["--chunks", "1,1"], "--chunks: repeats 1"), (["--quality_weights", "0"], "--quality_weights"),
    (["--quality_weights", "nan,inf"], "--quality_weights"), (["--quality_weights", "10,,100"], "--quality_weights"),
    (["--modes", "exact,fast"], "--modes"), (["--modes", "fixed_graph", "--device", "cpu"], "--modes"),
    (["--window_s", "0.5"], "--window_s"), (["--window_s", "inf"], "--window_s"), (["--window_s", "nan"], "--window_s"),
    (["--shape", "nope"], "--shape"), (["--output", "{dir}"], "--output {dir} is a directory"),
    (["--output", "{file}/x.json"], "is not a directory"),
    (["--cost_table", "{dir}/none.json"], "--cost_table: no cost table"),
    (["--cost_table", "{dir}"], "--cost_table: cost table {dir} is not a file"),
    (["--cost_table", "{file}"], "--cost_table: cost table {file} is corrupt")])
def test_bad_flags_name_the_flag(flags, name, tmp_path, capsys):
    err, paths = usage_error(ep_benchmark.parse_args, flags, tmp_path, capsys, file_text="{ not json")
    assert name.format(**paths) in err


@pytest.mark.parametrize("world_size, flags, name", [
    ("2", ["--gpu", "Z100"], "--gpu must be one of"), ("3", ["--shape", "tiny"], "--shape tiny: 3 ranks"),
    ("2", ["--gpu", "Z100", "--modes", "fixed"], None)])
def test_tables_the_run_needs_are_checked_with_the_flags(world_size, flags, name, monkeypatch, tmp_path, capsys):
    """With more than one GPU and the exact exchange, the energy-aware run reads the --gpu table: checked now."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    argv = ["--device", "cpu", "--output", str(tmp_path / "ep.json"), *flags]
    if name is None:  # no exact exchange: no energy-aware run, no table read
        assert ep_benchmark.parse_args(argv).gpu == "Z100"
        return
    with pytest.raises(SystemExit) as exc:
        ep_benchmark.parse_args(argv)
    assert exc.value.code == 2 and name in capsys.readouterr().err
