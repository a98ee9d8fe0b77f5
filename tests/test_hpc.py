"""bench.hpc_single_gpu_test on a CPU: the whole run at tiny sizes, its flags, the cost-model choice,
the wording of changes, the torchrun gather, and the cluster scripts' headers and command lines."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import hpc_single_gpu_test as hpc
from bench import train
from bench.harness import costs, criteria, measure
from bench.harness.corpus import checkpoint_path, save_checkpoint
from bench.harness.models import TransformerLM, model_dims
from calibration.priors import prior_table
from costmodel.kernel_cost_model import KernelCostModel
from router import EnergyAwareTTTRouter
from tests.cluster_scripts import directives, dry_run, modules_called
from tests.conftest import ON_GPU

REPO = Path(__file__).resolve().parent.parent
TINY = ["--d_model", "32", "--num_layers", "1", "--batch_size", "2", "--seq_length", "16", "--num_runs", "2",
        "--decode", "1,2", "--eval_bytes", "256", "--ttt_update_frequency", "16", "--ttt_chunk_size", "32",
        "--device", "cpu"]
CPU_REASON = hpc.NO_GPU
STATUSES = {"met", "not met", "not measured"}
# on a CUDA machine the MoE routing kernel cannot take CPU tensors (no interpreter): the real run is the GPU one
cpu_machine_only = pytest.mark.skipif(ON_GPU, reason="the CPU run of the benchmark; on a GPU run "
                                      "python -m bench.hpc_single_gpu_test --test_moe for real")


@pytest.fixture(autouse=True)
def cpu_runs_interpret(monkeypatch):
    """These tests parse (and the torchrun one runs) ``--device cpu`` runs. On a CUDA machine such a
    run's MoE needs Triton's interpreter or is refused (``bench._cli.moe_cpu_without_interpreter``);
    a subprocess inherits the variable before it imports Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def read(directory, name):
    return json.loads((Path(directory) / name).read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny run of all four models; only the dense checkpoint exists (the MoE runs on random weights)."""
    root = tmp_path_factory.mktemp("hpc")
    dims = model_dims(32, 16)
    path = checkpoint_path(root / "checkpoints", False, 32, 1, dims.num_experts, dims.top_k)
    save_checkpoint(path, TransformerLM(dims, 1, use_kernels=False), {
        "steps": 0, "corpus": {"note": "untrained, for the test"}, "heldout": {"bits_per_byte": None}})
    hpc.main(TINY + ["--output_dir", str(root / "out"), "--checkpoint_dir", str(root / "checkpoints")])
    return root / "out"


@cpu_machine_only
def test_cpu_run_writes_the_three_files_with_null_energy(cpu_run):
    results = read(cpu_run, "hpc_results.json")
    (device,) = results["devices"]
    assert list(device["models"]) == ["transformer", "transformer_ttt", "moe_energy_aware", "moe_topk"]
    assert device["energy_reason"] == CPU_REASON and device["throttling"]["observed"] is None
    for entry in device["models"].values():
        for phase in [entry["forward"], *entry["decode"]]:
            assert phase["measured"] is None and phase["measured_reason"] == CPU_REASON
            assert phase["peak_memory_gb"] is None and phase["latency_runs"] == 2 and phase["latency_ms_median"] > 0
            assert phase["mode"] == "eager" and phase["host_overhead_fraction"] is None
            assert phase["timer"] == "perf_counter" and phase["throughput_tokens_per_s"] > 0
            prediction = phase["prediction"]
            # the packaged H100 table was measured at the harness's dims, not these: the tile model carries it
            assert prediction["label"] == "prediction" and prediction["table_source"] == "modelled"
            assert prediction["energy_per_token_j"] > 0 and prediction["error_pct"] is None
        assert [p["batch_size"] for p in entry["decode"]] == [1, 2]
        assert any("attention" in why for why in entry["decode"][0]["prediction"]["excludes"])
    models = device["models"]
    assert models["transformer"]["forward"]["prediction"]["covers_all_work"]
    assert not models["transformer_ttt"]["forward"]["prediction"]["covers_all_work"]
    assert models["moe_topk"]["parameters"]["active_per_token"] < models["moe_topk"]["parameters"]["total"]
    assert models["transformer_ttt"]["forward"]["ttt"]["updates"] == 2  # 32 tokens a call, one update per 16
    assert models["moe_energy_aware"]["forward"]["ttt"]["updates"] > 0
    assert models["transformer"]["forward"]["ttt"] is None
    assert all(info["source"] == "modelled" and info["label"] == "prediction" and info["table_dims"]["d_model"] == 256
               for info in results["cost_models"].values())
    assert results["iso_quality"]["chosen"] is None and "not measured" in results["iso_quality"]["detail"]


@cpu_machine_only
def test_cpu_run_reports_quality_only_with_a_checkpoint(cpu_run):
    models = read(cpu_run, "hpc_results.json")["devices"][0]["models"]
    for name in ("transformer", "transformer_ttt"):
        assert models[name]["quality"]["bits_per_byte"] > 0 and models[name]["checkpoint"]["loaded"]
    assert models["transformer_ttt"]["quality"]["ttt"]["updates"] > 0  # the held-out files, read in order
    for name in ("moe_energy_aware", "moe_topk"):
        quality = models[name]["quality"]
        assert quality["bits_per_byte"] is None and quality["reason"].startswith(measure.NO_CHECKPOINT)
        assert "python -m bench.train" in quality["reason"]
    ttt = read(cpu_run, "hpc_summary.json")["ttt_on_vs_off"]["0"]
    assert ttt["on_bits_per_byte"] > 0 and ttt["off_bits_per_byte"] > 0
    assert ttt["change"].endswith(("(better)", "(worse)")) or ttt["change"] == "no change"


@cpu_machine_only
def test_cpu_run_summary_and_cost_model_report(cpu_run):
    summary = read(cpu_run, "hpc_summary.json")
    assert summary["provenance"]["torch"] and summary["parameters"]["d_model"] == 32
    assert summary["candidate"] == "moe_energy_aware"
    verdicts = summary["success_criteria"]["0"]
    assert len(verdicts) == 8 and [c["status"] for c in verdicts] == ["not measured"] * 8  # CPU timings judge nothing
    assert set(summary["comparisons"]["0"]) == {"transformer_ttt_vs_transformer", "moe_energy_aware_vs_transformer",
                                                "moe_topk_vs_transformer", "moe_energy_aware_vs_moe_topk"}
    report = read(cpu_run, "kernel_cost_model_test_results.json")
    assert report["cost_model"]["source"] == "modelled"  # the H100 table, measured at other dims
    assert all(row["source"] == "modelled" for rows in report["op_costs"].values() for row in rows)
    assert report["memory_pressure_factors"]["points"][0]["latency_stretch"] == 1.0
    assert len(report["predicted_vs_measured"]) == 4 * 3  # 4 models x (forward + 2 decode sizes)


@cpu_machine_only
def test_cpu_run_plots(cpu_run):
    plots = read(cpu_run, "hpc_summary.json")["plots"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in plots["skipped"]
        return
    for name in ("energy_per_token", "latency"):
        assert Path(plots[name]).read_bytes()[:4] == b"\x89PNG"
    assert plots["predicted_vs_measured_energy"].startswith("skipped: no measured energy")
    assert plots["energy_vs_quality"].startswith("skipped: needs measured energy")


@pytest.mark.parametrize("flags, named", [
    (["--d_model", "0"], "--d_model"),
    (["--d_model", "48"], "--d_model"),
    (["--num_experts", "4", "--top_k", "8"], "--top_k"),
    (["--gpu", "B300"], "--gpu"),
    (["--decode", "1,x"], "--decode"),
    (["--energy_aware_lr", "-1"], "--energy_aware_lr"),
    (["--objective_weights", "energy"], "--objective_weights"),
    (["--num_runs", "0"], "--num_runs"),
    (["--device", "tpu"], "--device"),
    (["--objective_weights", "energy=1,quality=0"], "--objective_weights"),
    (["--objective_weights", "energy=-1"], "--objective_weights"),
    (["--dense_only", "--objective_weights", "energy=1,quality=5"], "--objective_weights"),
    (["--preset", "deployment", "--d_model", "512"], "--d_model"),
    (["--preset", "huge"], "--preset"),
    (["--mode", "graph"], "--mode"),
    (["--output_dir", __file__], "--output_dir"),
    (["--decode", "1,1"], "--decode: repeats 1"),
    (["--eval_bytes", "1"], "--eval_bytes: must be >= 2"),
    (["--cost_table", "{dir}"], "--cost_table: cost table {dir} is not a file"),
    (["--cost_table", "{dir}/none.json"], "--cost_table: no cost table"),
    (["--cost_table", "{file}"], "--cost_table: cost table {file} is corrupt"),
    (["--checkpoint_dir", "{file}"], "--checkpoint_dir {file} is not a directory"),
    (["--checkpoint_dir", "{dir}/typo"], "--checkpoint_dir {dir}/typo does not exist"),
    (["--router_keep", "q2"], "--router_keep"),
    (["--router_keep", "k9"], "--router_keep keeps 9 experts but top_k is"),
    (["--dense_only", "--router_keep", "k1"], "--router_keep"),
], ids=["d_model", "d_model-48", "top_k", "gpu", "decode", "lr", "objective", "num_runs", "device", "quality-0",
        "negative-weight", "weights-without-moe", "preset-conflict", "preset", "graph-on-cpu", "output-file",
        "decode-repeated", "eval-bytes", "table-dir", "table-missing", "table-corrupt", "checkpoints-file",
        "checkpoints-missing", "keep-typo", "keep-above-k", "keep-without-moe"])
def test_bad_flags_name_the_flag(flags, named, tmp_path, capsys):
    (tmp_path / "file").write_text("{ not json")
    paths = {"dir": tmp_path, "file": tmp_path / "file"}
    flags = [flag.format(**paths) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        hpc.parse_args(flags + ["--device", "cpu"] if "--device" not in flags else flags)
    assert exit_info.value.code == 2 and named.format(**paths) in capsys.readouterr().err


def test_default_checkpoint_dir_may_be_missing(tmp_path, monkeypatch):
    """A fresh machine's quick start runs on random weights: only a --checkpoint_dir given otherwise must exist."""
    monkeypatch.chdir(tmp_path)
    _, args = hpc.parse_args(["--device", "cpu", "--dense_only"])
    assert args.checkpoint_dir == "checkpoints" and not (tmp_path / "checkpoints").exists()


def test_cpu_sizes_are_chosen_and_said():
    _, args = hpc.parse_args(["--device", "cpu", "--d_model", "128"])
    assert args.d_model == 128 and args.seq_length == hpc.CPU_SIZES["seq_length"]
    assert "d_model" not in args.cpu_sizes and "seq_length" in args.cpu_sizes
    assert args.gpu == "H100"  # a CPU predicts for an H100 unless told otherwise


def test_cost_model_choice():
    table_dims = model_dims(256, 512)
    measured, info = costs.select_cost_model("H100", table_dims)
    assert info["source"] == "measured" and not measured.is_prior and info["label"] == "prediction"
    # the measured table, carried to a shape it never ran as a whole
    modelled, info = costs.select_cost_model("H100", model_dims(2048, 512, 8, 2, d_ff=5632))
    assert info["source"] == "modelled" and modelled.dims.d_model == 2048 and info["table_gpu"] == "H100"
    assert info["table_dims"]["d_model"] == 256 and "modelled, not measured there" in info["why"]
    assert modelled.get_cost("flash_attention", 2)["source"] == "modelled" and not modelled.is_prior
    # the sweep ran this expert shape (2048 x 5632, 8 experts, top 2): the table's own points cost it
    assert modelled.get_cost("fused_experts", 8)["source"] == "interpolated"
    _, info = costs.select_cost_model("B200", model_dims(64, 64))  # no datasheet: a stand-in's, said so
    assert info["table_gpu"] == costs.PRIOR_PROXY_GPU and "stand-in" in info["why"]
    _, info = costs.select_cost_model("A100", model_dims(64, 64))
    assert info["source"] == "prior" and info["table_gpu"] == "A100"
    given, info = costs.select_cost_model("H100", replace(table_dims, d_model=512, n_heads=8), measured.path)
    assert info["source"] == "modelled" and given.dims.d_model == 512 and "--cost_table" in info["why"]


def test_changes_say_better_or_worse():
    assert criteria.change(87.7, 100.0, "less energy per token", "more energy per token") == \
        "12.3% less energy per token (better)"
    assert criteria.change(104.0, 100.0, "faster", "slower") == "4.0% slower (worse)"
    assert criteria.change(90.0, 100.0, "higher throughput", "lower throughput", lower_is_better=False) == \
        "10.0% lower throughput (worse)"
    assert criteria.change(100.001, 100.0, "faster", "slower") == "0.001% slower (worse)"
    assert criteria.change(None, 1.0, "faster", "slower") is None


def test_torchrun_gathers_one_entry_per_rank(tmp_path):
    """Two ranks on gloo (CPU): rank 0 writes one entry per device."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bench.hpc_single_gpu_test", *TINY, "--decode", "", "--output_dir", str(tmp_path),
               "--checkpoint_dir", str(tmp_path)]  # no checkpoints in it: random weights
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    devices = read(tmp_path, "hpc_results.json")["devices"]
    assert [d["rank"] for d in devices] == [0, 1] and all(d["models"]["transformer"]["forward"] for d in devices)
    assert set(read(tmp_path, "hpc_summary.json")["success_criteria"]) == {"0", "1"}


# ---- cluster scripts ------------------------------------------------------------------------------

SCRIPTS = {"bench/run_hpc_test.slurm": "#SBATCH", "bench/run_hpc_test.pbs": "#PBS"}


def test_slurm_header():
    options = dict(re.fullmatch(r"--([\w-]+)=(.+)", d).groups() for d in directives("bench/run_hpc_test.slurm",
                                                                                      "#SBATCH"))
    assert options["gres"].startswith("gpu:") and re.fullmatch(r"\d\d:\d\d:\d\d", options["time"])
    assert {"job-name", "nodes", "cpus-per-task", "mem", "output"} <= set(options)


def test_pbs_header():
    options = directives("bench/run_hpc_test.pbs", "#PBS")
    resources = " ".join(o for o in options if o.startswith("-l "))
    assert re.search(r"select=1:.*ngpus=\d+", resources) and re.search(r"walltime=\d\d:\d\d:\d\d", resources)
    assert any(o.startswith("-N ") for o in options) and any(o.startswith("-o ") for o in options)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_dry_run(script, tmp_path):
    """bash -n, then the script itself with python and torchrun stubbed: each command line it would
    run, with its variables expanded by bash, parses under the module's own argument parser."""
    env = dict(os.environ, SLURM_SUBMIT_DIR=str(tmp_path), PBS_O_WORKDIR=str(tmp_path),
               MODEL_FLAGS="--d_model 64 --num_experts 8")
    calls = dry_run(script, tmp_path, env)
    modules = modules_called(calls)
    assert set(modules) == {"bench.train", "bench.hpc_single_gpu_test"}
    assert train.parse_args(modules["bench.train"]).num_experts == 8
    on_cpu = [] if ON_GPU else ["--device", "cpu"]  # a CUDA host parses for its GPU
    _, args = hpc.parse_args(modules["bench.hpc_single_gpu_test"] + on_cpu)
    assert args.test_moe and args.d_model == 64 and (tmp_path / args.output_dir).is_dir()  # made in the job dir
    assert calls[-1][:2] == ["torchrun", "--standalone"]


@pytest.mark.parametrize("flag, keeps", [([], {"keep_top_k": None, "keep_share": 0.5}),
                                         (["--router_keep", "k1"], {"keep_top_k": 1, "keep_share": None}),
                                         (["--router_keep", "none"], {})])
def test_router_keep_reaches_the_energy_aware_routers(flag, keeps, tmp_path):
    """The main job's MoE routes with the measured baseline-preserving setting (p0.5) unless told."""
    _, args = hpc.parse_args(flag + ["--device", "cpu"])
    assert args.router_keep == keeps
    spec = measure.ModelSpec("moe_energy_aware", args.preset.moe_dims(), 1)
    table = tmp_path / "prior.json"
    table.write_text(json.dumps(prior_table("H100", spec.dims)))
    lm, _ = measure.build_model(spec, args, KernelCostModel("H100", table=table), None)
    gates = [block.moe.gate for block in lm.blocks]
    assert all(isinstance(g, EnergyAwareTTTRouter) for g in gates)
    assert all((g.keep_top_k, g.keep_share) == (keeps.get("keep_top_k"), keeps.get("keep_share")) for g in gates)
