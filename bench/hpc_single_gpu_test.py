"""``python -m bench.hpc_single_gpu_test``: dense vs TTT vs energy-aware MoE, measured on one GPU.

Models (``bench.models``, our kernels on a GPU, the torch references on a CPU):
``transformer`` (the baseline), ``transformer_ttt`` (test-time training of the final norm and
the last block's FFN, ``TTTLanguageModel``), and with ``--test_moe`` ``moe_energy_aware`` (every
router an ``EnergyAwareTTTRouter`` with gate adaptation: Muon with ``--muon_enabled``, else
Adam) and ``moe_topk`` (the same MoE with plain top-k routing). Each is measured on a forward
over [batch_size, seq_length] and on KV-cache decode steps (one token per sequence, the cache
held at seq_length // 2 positions) at the ``--decode`` batch sizes: latency mean ± std (CUDA
events; ``perf_counter`` on a CPU), throughput, peak memory, TTT updates, and on an NVIDIA GPU the
energy per token from the NVML energy counter over windows of at least 1 s of eager calls
(``calibration.energy``), board power and temperature (NVML) and the clock-event (throttle) bits.
Test-time updates run inside the measured calls, so their time and energy are in the figures.

Beside each measurement stands the kernel cost model's *prediction* (``get_plan_cost`` of the
model's plan): the table for the GPU when its dims are the model's, else an analytic prior built
here at the model's dims (``calibration.priors``), labelled with its source. Held-out quality
(bits per byte on the longest held-out stdlib files, ``bench.train``) comes from the checkpoints
``python -m bench.train`` writes; without one the models run on random weights and quality is
reported as not measured. Results go to ``--output_dir`` as ``hpc_results.json``,
``kernel_cost_model_test_results.json`` and ``hpc_summary.json`` (atomic writes), with PNG plots.

Without a GPU the same command runs end to end at small sizes (said in the output) with energy,
power and temperature null ("no NVIDIA GPU"). Under ``torchrun --nproc_per_node N`` each rank
benchmarks its own GPU and rank 0 writes one entry per device.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the MoE routing kernel; before triton is imported

import torch.distributed as dist  # noqa: E402

from bench._results import provenance, write_json_atomic  # noqa: E402
from bench.calibrate import gpu_matches  # noqa: E402
from bench.models import (DECODE_PLAN_EXCLUDES, TransformerLM, TTTLanguageModel, model_dims,  # noqa: E402
                          use_energy_aware_router)
from bench.train import (MOE_CPU_NEEDS_INTERPRETER, checkpoint_path, corpus_files, evaluate,  # noqa: E402
                         heldout_streams, load_checkpoint, moe_cpu_without_interpreter, positive_float, positive_int,
                         split_by_file, stdlib_root)
from calibration.energy import EagerRunner, event_times_ms, measure_energy, measure_idle_power_w  # noqa: E402
from calibration.nvml_meter import BackgroundSampler, meter_for_cuda_device  # noqa: E402
from calibration.priors import DATASHEETS, prior_table  # noqa: E402
from costmodel.kernel_cost_model import TABLE_DIR, KernelCostModel  # noqa: E402
from router.energy_router import EnergyAwareTTTRouter  # noqa: E402
from router.monitor import HardwareMonitor  # noqa: E402

NO_GPU = "no NVIDIA GPU"
NO_CHECKPOINT = "quality not measured: no checkpoint; random weights"
GPU_SIZES = {"d_model": 256, "num_layers": 4, "batch_size": 8, "seq_length": 512, "decode": "1,2,4,8,16,32,64",
             "eval_bytes": 131072}
CPU_SIZES = {"d_model": 64, "num_layers": 2, "batch_size": 2, "seq_length": 64, "decode": "1,4", "eval_bytes": 2048}
BASELINE = "transformer"
DESCRIPTIONS = {
    "transformer": "Simple Transformer (dense SwiGLU FFN): no test-time training, no hardware awareness",
    "transformer_ttt": "Simple Transformer + test-time training (final norm and last block's FFN)",
    "moe_energy_aware": "MoE + EnergyAwareTTTRouter (cost-biased top-k, bias and gate adapted at test time)",
    "moe_topk": "the same MoE with plain top-k routing",
}
PLAN_EXCLUDES = {
    "transformer": (),
    "transformer_ttt": ("the test-time updates (forward + backward + optimizer step): not table ops",),
    "moe_energy_aware": ("the router's cost lookup, tallies and test-time updates: not table ops",),
    "moe_topk": (),
}
PRIOR_PROXY_GPU = "H200"  # the stand-in datasheet for a GPU calibration.priors does not know
WARMUP_CALLS = 2
SAMPLE_INTERVAL_S = 0.2
ENERGY_REDUCTION_TARGET_PCT = 15.0
PREDICTION_ERROR_TARGET_PCT = 10.0
MEMORY_TARGET_PCT = 80.0
THROUGHPUT_KEPT_FRACTION = 0.95  # "maintained": at least 95% of the baseline's tokens/s


# ---- arguments ----------------------------------------------------------------------------------

def batch_sizes(text):
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = [0]
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers (or ''), got {text!r}")
    return sizes


def objective_weights(text):
    try:
        pairs = dict(item.split("=") for item in text.split(","))
        return {key.strip(): float(value) for key, value in pairs.items()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like energy=1,latency=0,quality=10, got {text!r}") from None


def known_gpus():
    return sorted({p.stem for p in TABLE_DIR.glob("*.json")} | set(DATASHEETS))


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.hpc_single_gpu_test", description=__doc__.split("\n\n")[0])
    size = "default: {} on a GPU, {} on a CPU"
    parser.add_argument("--d_model", type=positive_int, help=size.format(256, 64))
    parser.add_argument("--num_layers", type=positive_int, help=size.format(4, 2))
    parser.add_argument("--batch_size", type=positive_int, help=size.format(8, 2))
    parser.add_argument("--seq_length", type=positive_int, help=size.format(512, 64))
    parser.add_argument("--num_runs", type=positive_int, default=20, help="timed calls per measurement")
    parser.add_argument("--test_moe", action="store_true", help="also the two MoE models")
    parser.add_argument("--num_experts", type=positive_int, default=4)
    parser.add_argument("--top_k", type=positive_int, default=2)
    parser.add_argument("--ttt_chunk_size", type=positive_int, default=512)
    parser.add_argument("--ttt_update_frequency", type=positive_int, default=128)
    parser.add_argument("--energy_aware_lr", type=positive_float, default=1e-4)
    parser.add_argument("--muon_enabled", action="store_true",
                        help="Muon, not Adam, for the 2-D weights test-time training updates (FFN, router gate)")
    parser.add_argument("--gpu", default="detected",
                        help=f"the GPU whose cost table predicts ({', '.join(known_gpus())}); on a GPU it must be "
                             "the detected one; on a CPU default H100")
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", type=batch_sizes, help="decode batch sizes, comma-separated ('' skips decode); "
                                                           + size.format("1,2,4,8,16,32,64", "1,4"))
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where python -m bench.train wrote them")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (torchrun: each rank its LOCAL_RANK GPU)")
    parser.add_argument("--cost_table", default=None, help="a cost table at the model's dims (e.g. from "
                                                            "python -m bench.calibrate --d_model ... --output PATH)")
    parser.add_argument("--objective_weights", type=objective_weights, default="energy=1,latency=0,quality=10",
                        help="EnergyAwareTTTRouter's weights; a re-route crosses at most 1/quality of probability")
    parser.add_argument("--energy_trials", type=positive_int, default=3, help="energy windows (>= 1 s) per point")
    parser.add_argument("--eval_bytes", type=positive_int, help=size.format(131072, 2048) + " (held-out bytes)")
    return parser


def parse_args(argv=None, local_rank=0):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device, local_rank)
    on_gpu = args.device.type == "cuda"
    if args.test_moe and moe_cpu_without_interpreter(args.device):
        parser.error(f"--test_moe: {MOE_CPU_NEEDS_INTERPRETER}")
    args.cpu_sizes = [] if on_gpu else [k for k in CPU_SIZES if getattr(args, k) is None]
    for key, value in (GPU_SIZES if on_gpu else CPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, batch_sizes(value) if key == "decode" else value)
    if args.top_k > args.num_experts:
        parser.error(f"--top_k ({args.top_k}) must be <= --num_experts ({args.num_experts})")
    if args.d_model % 32:
        parser.error(f"--d_model must be a multiple of 32 (attention heads of 32 or 64), got {args.d_model}")
    if args.seq_length < 2:
        parser.error(f"--seq_length must be >= 2 (decode caches seq_length // 2 positions), got {args.seq_length}")
    args.gpu = resolve_gpu(parser, args.gpu, torch.cuda.get_device_name(args.device) if on_gpu else None)
    return parser, args


def resolve_device(parser, name, local_rank):
    if name not in ("auto", "cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: {NO_GPU} (torch.cuda.is_available() is False)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        parser.error(f"rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def resolve_gpu(parser, requested, detected_name):
    """The table name predictions use: the detected GPU's, or --gpu (which must be the detected one on a GPU)."""
    known = known_gpus()
    if requested not in ("detected", *known):
        parser.error(f"--gpu must be one of {', '.join(known)} (or 'detected'), got {requested!r}")
    if detected_name is None:
        return "H100" if requested == "detected" else requested
    if requested != "detected":
        if not gpu_matches(requested, detected_name):
            parser.error(f"--gpu {requested} does not match the detected GPU {detected_name!r}")
        return requested
    matches = [g for g in known if gpu_matches(g, detected_name)]
    if not matches:
        parser.error(f"--gpu: no cost table or datasheet fits the detected {detected_name!r}; pass --gpu with one "
                     f"of {', '.join(known)} (its predictions are for that GPU) or --cost_table")
    return matches[0]


# ---- the cost model -------------------------------------------------------------------------------

def select_cost_model(gpu, dims, table_path=None):
    """(KernelCostModel, info). ``--cost_table`` if given; else the committed table for ``gpu``
    when its dims are the model's (the plan's ops are then the ones it measured); else an analytic
    prior built here at the model's dims, from ``gpu``'s datasheet (``PRIOR_PROXY_GPU``'s when
    ``calibration.priors`` has none), labelled "prior"."""
    if table_path is not None:
        model = KernelCostModel(None, table=table_path)
        if model.dims != dims:
            raise ValueError(f"--cost_table {table_path} is at {asdict(model.dims)}, not the model's {asdict(dims)}")
        return model, _cost_info(model, gpu, str(table_path), "given with --cost_table")
    committed = TABLE_DIR / f"{gpu}.json"
    why = f"no committed {gpu} table"
    if committed.exists():
        model = KernelCostModel(gpu)
        if model.dims == dims:
            return model, _cost_info(model, gpu, str(committed), f"the committed {gpu} table is at the model's dims")
        why = f"the committed {gpu} table ({model.table['source']}) is at other dims {asdict(model.dims)}"
    model, sheet = prior_cost_model(gpu, dims)
    if sheet != gpu:
        why += f"; calibration.priors has no {gpu} datasheet, so the prior uses {sheet}'s as a stand-in"
    return model, _cost_info(model, gpu, f"in-process prior (calibration.priors.prior_table('{sheet}', dims))",
                             why + ": an analytic roofline prior at the model's dims, not a measurement")


def prior_cost_model(gpu, dims):
    """(KernelCostModel of an analytic prior at ``dims``, the GPU whose datasheet it uses)."""
    sheet = gpu if gpu in DATASHEETS else PRIOR_PROXY_GPU
    with tempfile.TemporaryDirectory() as tmp:  # KernelCostModel reads a file; the prior lives only in this run
        path = Path(tmp) / f"{sheet}_prior.json"
        write_json_atomic(path, prior_table(sheet, dims))
        return KernelCostModel(None, table=path), sheet


def _cost_info(model, gpu, table, why):
    return {"label": "prediction", "predictions_for": gpu, "table_gpu": model.gpu_type,
            "source": model.table["source"], "table": table, "why": why, "dims": asdict(model.dims),
            "has_thermal_model": bool(model.table.get("thermal")),
            "has_memory_pressure_curves": bool(model.table.get("memory_pressure"))}


# ---- models ---------------------------------------------------------------------------------------

def build_model(name, args, dims, cost_model, monitor):
    """(model, checkpoint info): a fresh model, with the trained weights where a checkpoint exists."""
    moe = name.startswith("moe")
    on_gpu = args.device.type == "cuda"
    lm = TransformerLM(dims, args.num_layers, moe=moe, use_kernels=on_gpu, device=args.device,
                       dtype=torch.bfloat16 if on_gpu else torch.float32, seed=args.seed)
    checkpoint = load_weights(lm, args, moe)
    if name == "transformer_ttt":
        return TTTLanguageModel(lm, args.ttt_update_frequency, args.ttt_chunk_size, args.energy_aware_lr,
                                args.muon_enabled), checkpoint
    if name == "moe_energy_aware":
        use_energy_aware_router(lm, cost_model, objective_weights=args.objective_weights,
                                ttt_update_frequency=args.ttt_update_frequency, ttt_chunk_size=args.ttt_chunk_size,
                                energy_aware_lr=args.energy_aware_lr, muon_enabled=args.muon_enabled,
                                ttt_gate=True, monitor=monitor)
    return lm, checkpoint


def load_weights(lm, args, moe):
    path = checkpoint_path(args.checkpoint_dir, moe, args.d_model, args.num_layers, args.num_experts, args.top_k)
    if not path.exists():
        return {"path": str(path), "loaded": False, "reason": NO_CHECKPOINT}
    try:
        meta = load_checkpoint(path, lm)
    except (RuntimeError, KeyError) as exc:  # a checkpoint of other shapes
        return {"path": str(path), "loaded": False, "reason": f"quality not measured: checkpoint unusable ({exc})"}
    return {"path": str(path), "loaded": True, "steps": meta["steps"], "trained_on": meta["corpus"],
            "train_heldout": meta["heldout"]}


def energy_aware_routers(model):
    lm = model.lm if isinstance(model, TTTLanguageModel) else model
    return [b.moe.gate for b in lm.blocks if lm.moe and isinstance(b.moe.gate, EnergyAwareTTTRouter)]


def reset_ttt_stats(model):
    if isinstance(model, TTTLanguageModel):
        model.reset_stats()
    for router in energy_aware_routers(model):
        router.reset_stats()


def ttt_summary(model):
    """Test-time updates since the last reset, and their time (None for models without test-time training)."""
    if isinstance(model, TTTLanguageModel):
        stats = model.stats()
        return {"updates": stats["ttt_updates"], "time_s": stats["ttt_time_s"], "optimizer": stats["optimizer"],
                "parameters": stats["ttt_parameters"], "parameter_count": stats["ttt_parameter_count"]}
    routers = energy_aware_routers(model)
    if not routers:
        return None
    stats = [r.stats() for r in routers]
    return {"updates": sum(s["ttt_updates"] for s in stats), "time_s": sum(s["ttt_time_s"] for s in stats),
            "rerouted_fraction": statistics.mean(s["rerouted_fraction"] for s in stats),
            "note": f"summed over the {len(routers)} layers' routers (each updates on its own)"}


# ---- measurement ----------------------------------------------------------------------------------

class DeviceEnv:
    """This rank's device, its NVML meter (None on a CPU) and the run's NVML timeline."""

    def __init__(self, device, rank):
        self.device, self.rank = device, rank
        self.on_gpu = device.type == "cuda"
        self.meter = self.sampler = self.idle_power_w = None
        self.energy_reason = NO_GPU if not torch.cuda.is_available() else f"running on the CPU (--device {device})"
        if self.on_gpu:
            self.meter = meter_for_cuda_device(device.index)
            self.energy_reason = None if self.meter.available else self.meter.unavailable_reason

    @property
    def metered(self):
        return self.meter is not None and self.meter.available

    def start(self):
        if self.metered:
            self.idle_power_w = measure_idle_power_w(self.meter)
            self.sampler = BackgroundSampler(self.meter, SAMPLE_INTERVAL_S).start()

    def stop(self):
        if self.sampler is not None:
            self.sampler.stop()

    def samples_between(self, t0, t1):
        return [s for s in (self.sampler.samples if self.sampler else []) if t0 <= s.time_s <= t1]


def time_calls_ms(fn, runs, on_gpu):
    """Per-call latency of ``runs`` calls, each waited for (CUDA events on a GPU, perf_counter on a CPU)."""
    if on_gpu:
        return event_times_ms(fn, runs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_phase(env, model, fn, tokens_per_call, args):
    """Latency, throughput, memory, TTT updates and (on a metered GPU) energy of ``fn``."""
    if env.on_gpu:
        torch.cuda.reset_peak_memory_stats(env.device)
    with torch.no_grad():
        for _ in range(WARMUP_CALLS):
            fn()
        reset_ttt_stats(model)
        latencies_ms = time_calls_ms(fn, args.num_runs, env.on_gpu)
    mean_ms = statistics.mean(latencies_ms)
    entry = {"tokens_per_call": tokens_per_call, "latency_ms_mean": mean_ms,
             "latency_ms_std": statistics.stdev(latencies_ms) if len(latencies_ms) > 1 else 0.0,
             "latency_runs": len(latencies_ms), "timer": "cuda_events" if env.on_gpu else "perf_counter",
             "throughput_tokens_per_s": tokens_per_call / (mean_ms * 1e-3), "ttt": ttt_summary(model)}
    if entry["ttt"] is not None:  # the updates ran inside the timed calls: their share of that time
        entry["ttt"]["share_of_timed_latency"] = entry["ttt"]["time_s"] * 1e3 / sum(latencies_ms)
    entry["measured"], entry["measured_reason"] = measure_energy_phase(env, fn, tokens_per_call, args.energy_trials)
    return entry | memory_entry(env)


def measure_energy_phase(env, fn, tokens_per_call, trials):
    """(energy, power and temperature from NVML, None) or (None, why not)."""
    if not env.metered:
        return None, env.energy_reason
    t0 = time.monotonic()
    runner = EagerRunner(fn)
    energy = measure_energy(env.meter, runner.run_for, env.idle_power_w, window_s=1.0, trials=trials)
    samples = env.samples_between(t0, time.monotonic())
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    return {"energy_per_token_j": energy["energy_j"] / tokens_per_call, "energy_per_call_j": energy["energy_j"],
            "energy_per_call_j_min": energy["energy_j_min"], "energy_per_call_j_max": energy["energy_j_max"],
            "power_w": energy["power_w"], "temperature_c_max": max(temps) if temps else None,
            "temperature_c_mean": statistics.mean(temps) if temps else None,
            "slowdown_reasons": slowdown_reasons(env.meter, samples), "calls_per_window": energy["calls_per_window"],
            "window_s": energy["window_s"], "idle_power_w": env.idle_power_w,
            "method": "NVML energy counter over >= 1 s windows of eager calls, idle tail removed"}, None


def slowdown_reasons(meter, samples):
    """Thermal/power slowdown reasons seen in any sample (None when NVML gives no clock-event bits)."""
    bits = [s.clock_event_reasons for s in samples if s.clock_event_reasons is not None]
    if not bits:
        return None
    return sorted({name for b in bits for name in meter.slowdown_reasons(b)})


def memory_entry(env):
    if not env.on_gpu:
        return {"peak_memory_gb": None, "memory_utilisation_pct": None,
                "peak_memory_reason": f"torch.cuda.max_memory_allocated needs a CUDA device ({env.energy_reason})"}
    peak = torch.cuda.max_memory_allocated(env.device)
    total = torch.cuda.get_device_properties(env.device).total_memory
    return {"peak_memory_gb": peak / 1e9, "memory_utilisation_pct": 100.0 * peak / total}


def predict(cost_model, info, plan, excludes, entry):
    """The cost model's prediction for one call, beside the measurement (errors where measured).

    ``energy_per_call_j`` is the plan's kernels alone; ``..._with_gaps`` also charges the table's
    gap power over (measured latency - predicted kernel time), as for eager calls in
    ``bench.kcm_accuracy``, so it leans on the measured GPU latency (none on a CPU)."""
    kernels_only = cost_model.get_plan_cost(plan)
    tokens = entry["tokens_per_call"]
    out = {"label": "prediction", "table_source": info["source"], "table": info["table"],
           "energy_per_call_j": kernels_only["energy_joules"],
           "energy_per_token_j": kernels_only["energy_joules"] / tokens,
           "kernel_latency_ms": kernels_only["latency_ms"], "covers_all_work": not excludes, "excludes": list(excludes)}
    if entry["timer"] == "cuda_events":
        with_gaps = cost_model.get_plan_cost(plan, measured_latency_ms=entry["latency_ms_mean"])
        out["energy_per_call_j_with_gaps"] = with_gaps["energy_joules"]
    else:
        out["energy_per_call_j_with_gaps"] = None
        out["with_gaps_reason"] = "the gap term needs the GPU's measured latency"
    measured = entry["measured"]
    for key in ("energy_per_call_j", "energy_per_call_j_with_gaps"):
        error_key = "error_pct" + key[len("energy_per_call_j"):]
        out[error_key] = None if measured is None or out[key] is None else \
            (out[key] - measured["energy_per_call_j"]) / measured["energy_per_call_j"] * 100.0
    if measured is None:
        out["error_reason"] = f"no measured energy: {entry['measured_reason']}"
    return out


def text_rows(text, rows, length, device):
    """[rows, length] int64 windows of held-out ``text`` (uint8), consecutive, wrapping around."""
    if len(text) <= length:
        text = text.repeat(length // max(1, len(text)) + 2)
    starts = [(i * length) % (len(text) - length) for i in range(rows)]
    return torch.stack([text[s:s + length] for s in starts]).to(device, torch.long)


def forward_phase(env, model, text, args, cost_model, info, name):
    tokens = text_rows(text, args.batch_size, args.seq_length, env.device)
    entry = {"batch_size": args.batch_size, "seq_length": args.seq_length}
    entry |= measure_phase(env, model, lambda: model(tokens), tokens.numel(), args)
    entry["prediction"] = predict(cost_model, info, model.cost_plan(args.batch_size), PLAN_EXCLUDES[name], entry)
    return entry


def decode_phase(env, model, text, batch_size, args, cost_model, info, name):
    """Decode steps at ``batch_size``: the cache holds seq_length // 2 prompt positions and every
    step rewrites the next slot, so each step attends to the same context length."""
    context = args.seq_length // 2
    prompt = text_rows(text, batch_size, context + 1, env.device)
    cache = model.new_cache(batch_size)
    with torch.no_grad():
        model(prompt[:, :context], cache)
    next_tokens = prompt[:, context:]

    def step():
        cache.length = context
        return model(next_tokens, cache)
    entry = {"batch_size": batch_size, "context": context}
    entry |= measure_phase(env, model, step, batch_size, args)
    excludes = PLAN_EXCLUDES[name] + DECODE_PLAN_EXCLUDES
    entry["prediction"] = predict(cost_model, info, model.decode_cost_plan(batch_size), excludes, entry)
    return entry


def measure_quality(model, checkpoint, streams, args):
    if not checkpoint["loaded"]:
        return {"bits_per_byte": None, "perplexity": None, "reason": checkpoint["reason"]}
    reset_ttt_stats(model)
    quality = evaluate(model, streams, args.seq_length, args.device)
    return quality | {"ttt": ttt_summary(model), "method": "longest held-out stdlib files, front to back in "
                      "windows of seq_length (each its own context), one window per forward"}


def benchmark_model(name, env, args, dims, cost, text, streams, monitor):
    cost_model, info = cost
    print(f"[rank {env.rank}] {name}: quality", file=sys.stderr, flush=True)
    model, checkpoint = build_model(name, args, dims, cost_model, monitor)
    entry = {"description": DESCRIPTIONS[name], "parameters": model.parameter_counts(), "checkpoint": checkpoint,
             "quality": measure_quality(model, checkpoint, streams, args)}
    model, _ = build_model(name, args, dims, cost_model, monitor)  # fresh: quality's test-time updates undone
    print(f"[rank {env.rank}] {name}: forward", file=sys.stderr, flush=True)
    entry["forward"] = forward_phase(env, model, text, args, cost_model, info, name)
    entry["decode"] = []
    for batch_size in args.decode:
        print(f"[rank {env.rank}] {name}: decode B={batch_size}", file=sys.stderr, flush=True)
        entry["decode"].append(decode_phase(env, model, text, batch_size, args, cost_model, info, name))
    return entry


def model_names(args):
    return ["transformer", "transformer_ttt"] + (["moe_energy_aware", "moe_topk"] if args.test_moe else [])


def run_device(env, args, dims, cost, text, streams):
    """This rank's entry: every model on its device, and the NVML throttle record of the whole run."""
    env.start()
    monitor = HardwareMonitor(meter=env.meter).start() if env.metered and args.test_moe else None
    try:
        models = {name: benchmark_model(name, env, args, dims, cost, text, streams, monitor)
                  for name in model_names(args)}
    finally:
        if monitor is not None:
            monitor.stop()
        env.stop()
    return device_header(env) | {"models": models, "throttling": throttling(env)}


def device_header(env):
    header = {"rank": env.rank, "device": str(env.device), "energy_measured": env.metered,
              "energy_reason": env.energy_reason, "idle_power_w": env.idle_power_w}
    if env.on_gpu:
        props = torch.cuda.get_device_properties(env.device)
        header |= {"gpu_name": props.name, "memory_total_gb": props.total_memory / 1e9,
                   "nvml_index": env.meter.device_index, "gpu_uuid": env.meter.uuid(),
                   "driver": env.meter.driver_version()}
    return header


def throttling(env):
    if not env.metered:
        return {"observed": None, "reason": env.energy_reason}
    reasons = slowdown_reasons(env.meter, env.sampler.samples)
    if reasons is None:
        return {"observed": None, "reason": "NVML gave no clock-event bits"}
    return {"observed": bool(reasons), "reasons": reasons, "samples": len(env.sampler.samples),
            "source": "NVML clock-event bits (thermal or power slowdown), sampled every "
                      f"{SAMPLE_INTERVAL_S} s over the whole run"}


# ---- multi-GPU ------------------------------------------------------------------------------------

def init_distributed(device):
    """(rank, world size); under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def gather_to_rank0(entry, world):
    """Every rank's ``entry`` as a list on rank 0 (in rank order), None on the others."""
    if world == 1:
        return [entry]
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(entry, gathered, dst=0)
    return gathered


# ---- reports --------------------------------------------------------------------------------------

def change(new, base, better, worse, lower_is_better=True):
    """'12.3% less energy per token (better)': the sign in words, never a bare +/-."""
    if new is None or base is None:
        return None
    pct = (new - base) / base * 100.0
    if pct == 0:
        return "no change"
    improved = pct < 0 if lower_is_better else pct > 0
    size = f"{abs(pct):.1f}" if abs(pct) >= 0.1 else f"{abs(pct):.2g}"  # never a nonzero change shown as 0.0%
    return f"{size}% {better if improved else worse} ({'better' if improved else 'worse'})"


def headline(entry):
    """The forward figures of one model entry that comparisons use."""
    forward = entry["forward"]
    return {"energy_per_token_j": (forward["measured"] or {}).get("energy_per_token_j"),
            "latency_ms": forward["latency_ms_mean"], "throughput_tokens_per_s": forward["throughput_tokens_per_s"],
            "bits_per_byte": entry["quality"]["bits_per_byte"]}


def comparison_pairs(models):
    """(model, reference): every model against the baseline; the router against plain top-k (its own effect)."""
    pairs = [(name, BASELINE) for name in models if name != BASELINE]
    return pairs + ([("moe_energy_aware", "moe_topk")] if "moe_topk" in models else [])


def compare_phase(new, base):
    energy = [(p["measured"] or {}).get("energy_per_token_j") for p in (new, base)]
    return {"energy_per_token": change(*energy, "less energy per token", "more energy per token"),
            "latency": change(new["latency_ms_mean"], base["latency_ms_mean"], "faster", "slower"),
            "throughput": change(new["throughput_tokens_per_s"], base["throughput_tokens_per_s"],
                                 "higher throughput", "lower throughput", lower_is_better=False)}


def comparisons(models):
    out = {}
    for name, ref in comparison_pairs(models):
        new, base = models[name], models[ref]
        quality = change(new["quality"]["bits_per_byte"], base["quality"]["bits_per_byte"],
                         "lower held-out bits/byte", "higher held-out bits/byte")
        decode = {str(n["batch_size"]): compare_phase(n, b) for n, b in zip(new["decode"], base["decode"])}
        out[f"{name}_vs_{ref}"] = {"model": name, "vs": ref, "forward": compare_phase(new["forward"], base["forward"]),
                                   "quality": quality, "decode": decode}
    return out


def ttt_on_vs_off(models):
    """Held-out quality of the same checkpoint with test-time training on (transformer_ttt) and off."""
    on, off = models["transformer_ttt"]["quality"], models["transformer"]["quality"]
    if on["bits_per_byte"] is None or off["bits_per_byte"] is None:
        return None
    return {"on_bits_per_byte": on["bits_per_byte"], "off_bits_per_byte": off["bits_per_byte"],
            "files": on["files"], "bytes": on["bytes"], "ttt_updates": on["ttt"]["updates"],
            "change": change(on["bits_per_byte"], off["bits_per_byte"], "lower bits/byte", "higher bits/byte")}


def candidate_name(args):
    return "moe_energy_aware" if args.test_moe else "transformer_ttt"


def criterion(text, status, value=None, detail=None):
    return {"criterion": text, "status": status, "value": value, "detail": detail}


def success_criteria(device, candidate):
    models = device["models"]
    cand, base = headline(models[candidate]), headline(models[BASELINE])
    return [energy_criterion(cand, base, candidate, device), prediction_criterion(models, device),
            throttle_criterion(device), memory_criterion(models, device), throughput_criterion(cand, base, candidate)]


def energy_criterion(cand, base, candidate, device):
    text = f"energy per token reduced > {ENERGY_REDUCTION_TARGET_PCT:.0f}% vs {BASELINE} ({candidate}, forward)"
    if cand["energy_per_token_j"] is None or base["energy_per_token_j"] is None:
        return criterion(text, "not measured", detail=device["energy_reason"])
    reduction = (1.0 - cand["energy_per_token_j"] / base["energy_per_token_j"]) * 100.0
    return criterion(text, "met" if reduction > ENERGY_REDUCTION_TARGET_PCT else "not met", reduction,
                     f"{reduction:.1f}% reduction")


def prediction_criterion(models, device):
    text = (f"energy prediction error < {PREDICTION_ERROR_TARGET_PCT:.0f}% (forwards whose plan covers all "
            "their work, with gap power, vs measured)")
    errors = {name: e["forward"]["prediction"]["error_pct_with_gaps"] for name, e in models.items()
              if e["forward"]["prediction"]["covers_all_work"]}
    errors = {k: v for k, v in errors.items() if v is not None}
    if not errors:
        return criterion(text, "not measured", detail=device["energy_reason"])
    worst = max(abs(v) for v in errors.values())
    return criterion(text, "met" if worst < PREDICTION_ERROR_TARGET_PCT else "not met", worst,
                     ", ".join(f"{k} {v:+.1f}%" for k, v in errors.items()))


def throttle_criterion(device):
    text = "no thermal throttling observed (NVML thermal/power slowdown bits)"
    record = device["throttling"]
    if record["observed"] is None:
        return criterion(text, "not measured", detail=record["reason"])
    return criterion(text, "not met" if record["observed"] else "met", record["reasons"])


def memory_criterion(models, device):
    text = f"memory utilisation < {MEMORY_TARGET_PCT:.0f}% (peak allocated / device memory)"
    peaks = [p["memory_utilisation_pct"] for e in models.values() for p in [e["forward"], *e["decode"]]
             if p["memory_utilisation_pct"] is not None]
    if not peaks:
        return criterion(text, "not measured", detail=device["energy_reason"])
    return criterion(text, "met" if max(peaks) < MEMORY_TARGET_PCT else "not met", max(peaks))


def throughput_criterion(cand, base, candidate):
    text = f"throughput maintained ({candidate} >= {THROUGHPUT_KEPT_FRACTION:.0%} of {BASELINE}'s tokens/s, forward)"
    ratio = cand["throughput_tokens_per_s"] / base["throughput_tokens_per_s"]
    return criterion(text, "met" if ratio >= THROUGHPUT_KEPT_FRACTION else "not met", ratio, f"{ratio:.2f}x")


def fmt(value, spec, suffix=""):
    return "—" if value is None else format(value, spec) + suffix


def print_device_report(device, compared, criteria, info, candidate):
    print(f"\n== {device['device']} ({device.get('gpu_name', 'CPU')}), rank {device['rank']} ==")
    print(f"predictions: {info['source']} table for {info['predictions_for']} ({info['table']})")
    print(f"{'model':17} {'params total/active':>21} {'phase':>10} {'latency ms':>17} {'tokens/s':>10} "
          f"{'J/token measured':>17} {'J/token predicted':>18} {'error':>7} {'bits/byte':>9}")
    for name, entry in device["models"].items():
        params = entry["parameters"]
        for label, phase in [("forward", entry["forward"])] + [(f"decode B{p['batch_size']}", p)
                                                               for p in entry["decode"]]:
            measured, pred = phase["measured"] or {}, phase["prediction"]
            print(f"{name:17} {params['total'] / 1e6:9.2f}M/{params['active_per_token'] / 1e6:8.2f}M "
                  f"{label:>10} {phase['latency_ms_mean']:9.3f} ± {phase['latency_ms_std']:5.3f} "
                  f"{phase['throughput_tokens_per_s']:10.0f} {fmt(measured.get('energy_per_token_j'), '.3e'):>17} "
                  f"{pred['energy_per_token_j']:18.3e} {fmt(pred['error_pct_with_gaps'], '+.1f', '%'):>7} "
                  f"{fmt(entry['quality']['bits_per_byte'], '.3f') if label == 'forward' else '':>9}")
    if device["energy_reason"]:
        print(f"energy, power, temperature: null ({device['energy_reason']}); predicted J/token is a prediction "
              f"from the {info['source']} table")
    for name, entry in device["models"].items():
        if entry["quality"]["bits_per_byte"] is None:
            print(f"{name}: {entry['quality']['reason']}")
    for c in compared.values():
        said = [v for v in c["forward"].values() if v is not None] + ([c["quality"]] if c["quality"] else [])
        print(f"{c['model']} vs {c['vs']} (forward): {'; '.join(said)}")
    ttt = ttt_on_vs_off(device["models"])
    if ttt:
        print(f"TTT on vs off, {ttt['files']} long held-out files ({ttt['bytes']} bytes): "
              f"{ttt['on_bits_per_byte']:.4f} vs {ttt['off_bits_per_byte']:.4f} bits/byte, {ttt['change']}")
    print(f"success criteria ({candidate} vs {BASELINE}):")
    for c in criteria:
        print(f"  [{c['status']}] {c['criterion']}" + (f": {c['detail']}" if c["detail"] else ""))


# ---- the cost model report ------------------------------------------------------------------------

TOKEN_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
SEQUENCE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
FACTOR_OP, FACTOR_BATCH = "swiglu_ffn", 64
ASSUMED_TEMP_C = 40.0


def cost_model_report(cost_model, info, devices, current_temp_c):
    """kernel_cost_model_test_results.json: op costs, thermal and memory-pressure factors, thermal-safe
    batch sizes, and every prediction beside its measurement. All cost figures are predictions."""
    return {"schema": 1, "provenance": provenance(), "cost_model": info,
            "op_costs": {op: [op_cost(cost_model, op, b) for b in op_batches(op)] for op in cost_model.ops},
            "thermal_factors": thermal_factors(cost_model),
            "memory_pressure_factors": pressure_factors(cost_model),
            "thermal_safe_batch_sizes": thermal_safe(cost_model, current_temp_c),
            "measured_vs_prior": measured_vs_prior(cost_model, info),
            "predicted_vs_measured": prediction_rows(devices)}


def op_batches(op):
    return SEQUENCE_BATCHES if op in ("attention_qk", "attention_av", "flash_attention") else TOKEN_BATCHES


def measured_vs_prior(cost_model, info):
    """A measured table's op costs against the analytic prior at the same dims (measured / prior)."""
    if cost_model.is_prior:
        return {"ops": None, "reason": "the table in use is itself a prior: nothing measured at these dims"}
    prior, sheet = prior_cost_model(info["predictions_for"], cost_model.dims)
    ops = {op: [{"batch_size": b,
                 "energy_ratio": cost_model.get_cost(op, b)["energy_joules"] / prior.get_cost(op, b)["energy_joules"],
                 "latency_ratio": cost_model.get_cost(op, b)["latency_ms"] / prior.get_cost(op, b)["latency_ms"]}
                for b in op_batches(op)] for op in cost_model.ops if op in prior.ops}
    return {"prior_datasheet": sheet, "ratio": "measured-table prediction / prior prediction", "ops": ops}


def op_cost(cost_model, op, batch_size):
    cost = cost_model.get_cost_breakdown(op, batch_size)
    return {"batch_size": batch_size, "energy_j": cost["energy_joules"], "latency_ms": cost["latency_ms"],
            "power_w": cost["power_w"], "static_energy_j": cost["static_energy_joules"],
            "dynamic_energy_j": cost["dynamic_energy_joules"], "compute_bound_ms": cost["compute_bound_ms"],
            "memory_bound_ms": cost["memory_bound_ms"], "source": cost["source"]}


def thermal_factors(cost_model):
    thermal = cost_model.table.get("thermal")
    if not thermal or not thermal.get("clock_vs_temp"):
        return {"points": None, "reason": "the table has no thermal model (priors carry none)"}
    base = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH)
    coolest = thermal["clock_vs_temp"][0]["temp_c"]
    temps = sorted({coolest, 50.0, 65.0, 80.0, thermal.get("slowdown_temp_c") or 89.0})
    points = []
    for temp in temps:
        cost = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH, current_temp=temp)
        points.append({"temp_c": temp, "latency_stretch": cost["latency_ms"] / base["latency_ms"],
                       "energy_stretch": cost["energy_joules"] / base["energy_joules"], "source": cost["source"],
                       "warning": cost.get("warning")})
    return {"op": FACTOR_OP, "batch_size": FACTOR_BATCH, "points": points}


def pressure_factors(cost_model):
    base = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH)
    points = []
    for pressure in (0.0, 0.25, 0.5, 0.75, 0.9):
        cost = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH, memory_pressure=pressure)
        points.append({"memory_pressure": pressure, "latency_stretch": cost["latency_ms"] / base["latency_ms"],
                       "source": cost["source"]})
    curve = "measured stretch curve" if cost_model.pressure_curve(FACTOR_OP) else "roofline (no measured curve)"
    return {"op": FACTOR_OP, "batch_size": FACTOR_BATCH, "basis": curve, "points": points}


def thermal_safe(cost_model, current_temp_c):
    temp, temp_source = (current_temp_c, "NVML at the start of the run") if current_temp_c is not None \
        else (ASSUMED_TEMP_C, f"assumed ({NO_GPU} reading)")
    sizes = {op: {str(rise): cost_model.get_thermal_safe_batch_size(op, temp, rise) for rise in (0.1, 1.0, 5.0)}
             for op in cost_model.ops}
    if all(v is None for by_rise in sizes.values() for v in by_rise.values()):
        return {"ops": None, "reason": "the table has no thermal model (priors carry none)"}
    return {"current_temp_c": temp, "temp_source": temp_source, "max_temp_increase_c": [0.1, 1.0, 5.0], "ops": sizes}


def prediction_rows(devices):
    rows = []
    for device in devices:
        for name, entry in device["models"].items():
            for phase, p in [("forward", entry["forward"])] + [("decode", d) for d in entry["decode"]]:
                measured = p["measured"] or {}
                rows.append({"rank": device["rank"], "model": name, "phase": phase, "batch_size": p["batch_size"],
                             "predicted_energy_per_call_j": p["prediction"]["energy_per_call_j"],
                             "predicted_energy_per_call_j_with_gaps": p["prediction"]["energy_per_call_j_with_gaps"],
                             "measured_energy_per_call_j": measured.get("energy_per_call_j"),
                             "error_pct": p["prediction"]["error_pct"],
                             "error_pct_with_gaps": p["prediction"]["error_pct_with_gaps"],
                             "covers_all_work": p["prediction"]["covers_all_work"]})
    return rows


# ---- plots ----------------------------------------------------------------------------------------

def write_plots(devices, output_dir, info):
    """PNG plots; {name: path} or {name: why skipped}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"skipped": f"matplotlib is not installed ({exc}); pip install matplotlib"}
    label = (lambda d, name: f"{name}\n(rank {d['rank']})") if len(devices) > 1 else (lambda d, name: name)
    pairs = [(d, name, e) for d in devices for name, e in d["models"].items()]
    out = {"energy_per_token": plot_energy(plt, pairs, label, output_dir, info),
           "latency": plot_latency(plt, pairs, label, output_dir)}
    out["predicted_vs_measured_energy"] = plot_predicted_vs_measured(plt, pairs, output_dir, info)
    return out


def plot_energy(plt, pairs, label, output_dir, info):
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(pairs)), 4))
    xs = range(len(pairs))
    measured = [(e["forward"]["measured"] or {}).get("energy_per_token_j") for _, _, e in pairs]
    predicted = [e["forward"]["prediction"]["energy_per_token_j"] for _, _, e in pairs]
    if any(m is not None for m in measured):
        ax.bar([x - 0.2 for x in xs], [m or 0.0 for m in measured], 0.4, label="measured (NVML)")
    else:
        ax.set_title(f"measured energy: none ({pairs[0][0]['energy_reason']})")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, hatch="//", alpha=0.6,
           label=f"prediction ({info['source']} table, kernels only)")
    ax.set_xticks(list(xs), [label(d, n) for d, n, _ in pairs], rotation=15)
    ax.set_ylabel("energy per token (J), forward")
    ax.legend()
    return save(fig, plt, Path(output_dir) / "energy_per_token.png")


def plot_latency(plt, pairs, label, output_dir):
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(12, 3 * len(pairs)), 4.5))
    xs = range(len(pairs))
    left.bar(list(xs), [e["forward"]["latency_ms_mean"] for _, _, e in pairs],
             yerr=[e["forward"]["latency_ms_std"] for _, _, e in pairs], capsize=4)
    left.set_xticks(list(xs), [label(d, n) for d, n, _ in pairs], rotation=15)
    left.set_ylabel("forward latency per batch (ms, mean ± std)")
    for d, name, e in pairs:
        if e["decode"]:
            right.errorbar([p["batch_size"] for p in e["decode"]], [p["latency_ms_mean"] for p in e["decode"]],
                           yerr=[p["latency_ms_std"] for p in e["decode"]], marker="o", label=label(d, name))
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("decode batch size")
    right.set_ylabel("decode step latency (ms)")
    if right.has_data():
        right.legend()
    return save(fig, plt, Path(output_dir) / "latency.png")


def plot_predicted_vs_measured(plt, pairs, output_dir, info):
    points = [(p["prediction"]["energy_per_call_j_with_gaps"], p["measured"]["energy_per_call_j"], name)
              for _, name, e in pairs for p in [e["forward"], *e["decode"]]
              if p["measured"] is not None and p["prediction"]["energy_per_call_j_with_gaps"] is not None]
    if not points:
        return f"skipped: no measured energy ({pairs[0][0]['energy_reason']})"
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in dict.fromkeys(n for _, _, n in points):
        ax.scatter([m for p, m, n in points if n == name], [p for p, m, n in points if n == name], label=name)
    low, high = min(min(p, m) for p, m, _ in points), max(max(p, m) for p, m, _ in points)
    ax.plot([low, high], [low, high], "k--", linewidth=1, label="prediction = measurement")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured energy per call (J, NVML)")
    ax.set_ylabel(f"predicted energy per call (J, {info['source']} table + gap power)")
    ax.legend(fontsize=7)
    return save(fig, plt, Path(output_dir) / "predicted_vs_measured_energy.png")


def save(fig, plt, path):
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")  # atomic, as the JSON files
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


# ---- main -----------------------------------------------------------------------------------------

def parameters(args):
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}


def sizes_note(args):
    if not args.cpu_sizes:
        return None
    return (f"{NO_GPU if not torch.cuda.is_available() else 'CPU run'}: small CPU sizes for "
            f"{', '.join(args.cpu_sizes)} (flags given are kept); CPU timings are the torch references (and the MoE "
            "routing kernel under Triton's interpreter), not a GPU's")


def write_outputs(args, devices, cost, current_temp_c):
    cost_model, info = cost
    out = Path(args.output_dir)
    candidate = candidate_name(args)
    compared = {d["rank"]: comparisons(d["models"]) for d in devices}
    criteria = {d["rank"]: success_criteria(d, candidate) for d in devices}
    note = sizes_note(args)
    results = {"schema": 1, "provenance": provenance(), "parameters": parameters(args), "sizes_note": note,
               "cost_model": info, "baseline": BASELINE, "candidate": candidate, "devices": devices}
    write_json_atomic(out / "hpc_results.json", results)
    write_json_atomic(out / "kernel_cost_model_test_results.json",
                      cost_model_report(cost_model, info, devices, current_temp_c))
    plots = write_plots(devices, out, info)
    summary = {"schema": 1, "provenance": provenance(), "hardware": [device_hardware(d) for d in devices],
               "parameters": parameters(args), "sizes_note": note, "baseline": BASELINE, "candidate": candidate,
               "cost_model_available": True, "cost_model": info,
               "results": {d["rank"]: {name: headline(e) | {"parameters": e["parameters"]}
                                       for name, e in d["models"].items()} for d in devices},
               "comparisons": compared, "ttt_on_vs_off": {d["rank"]: ttt_on_vs_off(d["models"]) for d in devices},
               "success_criteria": criteria, "plots": plots,
               "files": ["hpc_results.json", "kernel_cost_model_test_results.json", "hpc_summary.json"]}
    write_json_atomic(out / "hpc_summary.json", summary)
    if note:
        print(note)
    for device in devices:
        print_device_report(device, compared[device["rank"]], criteria[device["rank"]], info, candidate)
    print(f"\nwrote {', '.join(str(out / f) for f in summary['files'])}")
    print("plots: " + "; ".join(f"{k}: {v}" for k, v in plots.items()))


def device_hardware(device):
    keys = ("rank", "device", "gpu_name", "gpu_uuid", "driver", "memory_total_gb", "nvml_index", "energy_measured",
            "energy_reason", "idle_power_w")
    return {k: device.get(k) for k in keys} | {"cpu_count": os.cpu_count()}


def main(argv=None):
    parser, args = parse_args(argv, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = init_distributed(args.device)
    if rank == 0 and sizes_note(args):
        print(sizes_note(args), flush=True)
    dims = model_dims(args.d_model, args.seq_length, args.num_experts, args.top_k)
    try:
        cost = select_cost_model(args.gpu, dims, args.cost_table)
    except ValueError as exc:
        parser.error(str(exc))
    root = stdlib_root()
    _, heldout = split_by_file(corpus_files(root))
    streams = heldout_streams(root, heldout, args.eval_bytes)
    text = torch.cat(streams)
    env = DeviceEnv(args.device, rank)
    current_temp_c = env.meter.read().temperature_c if env.metered else None
    device_entry = run_device(env, args, dims, cost, text, streams)
    devices = gather_to_rank0(device_entry, world)
    if rank == 0:
        write_outputs(args, devices, cost, current_temp_c)
    if world > 1:
        dist.barrier()  # every rank leaves together: a gloo rank exiting while rank 0 writes can abort the group
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
