"""Measuring the HPC comparison's models on one device: build, quality, forward and decode phases.

A model spec (``ModelSpec``) names a model, its dims and its checkpoint; ``run_device`` measures
each spec's held-out quality, its forward over [batch_size, seq_length] and its decode steps (one
token per sequence, the cache holding seq_length // 2 positions) in the run's modes
(``bench.harness.graphs``: CUDA-graph replays by default on a GPU, eager calls for comparison).
Per phase: latency (graph replays back to back, timed with CUDA events; eager calls each waited
for), the kernels' own GPU time from the profiler and the host-overhead fraction it leaves, the
weight-read floor of a decode step, throughput, peak memory, test-time updates, and on an NVIDIA
GPU the energy per token from the NVML energy counter over windows of at least 1 s
(``calibration.energy``), board power, temperature and clock-event (throttle) bits.
"""
import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness import graphs
from bench.harness.corpus import checkpoint_path, evaluate, load_checkpoint
from bench.harness.costs import NO_GPU, predict
from bench.harness.floor import copy_bandwidth_bytes_per_s, weight_read_floor
from bench.harness.models import DECODE_PLAN_EXCLUDES, TransformerLM, use_energy_aware_router
from bench.harness.ttt_model import TTTLanguageModel
from calibration.energy import EagerRunner, event_times_ms, measure_energy, measure_idle_power_w
from calibration.nvml_meter import BackgroundSampler, GpuMeter, meter_for_cuda_device
from costmodel.kernel_cost_model import KernelCostModel
from router.energy_router import EnergyAwareTTTRouter
from router.monitor import HardwareMonitor

NO_CHECKPOINT = "quality not measured: no checkpoint; random weights"
DESCRIPTIONS = {
    "transformer": "Simple Transformer (dense SwiGLU FFN): no test-time training, no hardware awareness",
    "transformer_ttt": "Simple Transformer + test-time training (final norm and last block's FFN)",
    "moe_energy_aware": "MoE + EnergyAwareTTTRouter (cost-biased top-k, bias and gate adapted at test time)",
    "moe_topk": "the same MoE with plain top-k routing",
    "dense_iso": "dense transformer sized to the MoE's held-out bits/byte (iso-quality baseline)",
}
PLAN_EXCLUDES = {
    "transformer": (),
    "transformer_ttt": ("the test-time updates (forward + backward + optimizer step): not table ops",),
    "moe_energy_aware": ("the router's cost lookup, tallies and test-time updates: not table ops",),
    "moe_topk": (),
    "dense_iso": (),
}
SAMPLE_INTERVAL_S = 0.2
CALLS_PER_TIMING = 10  # graph replays timed back to back between two events
PROFILED_CALLS = 10


@dataclass(frozen=True)
class ModelSpec:
    """One compared model: ``name`` (a key of DESCRIPTIONS), its dims and layers, MoE or not."""
    name: str
    dims: object
    num_layers: int

    @property
    def moe(self) -> bool:
        return self.name.startswith("moe")


# ---- models ---------------------------------------------------------------------------------------

def build_model(spec: ModelSpec, args: argparse.Namespace, cost_model: KernelCostModel,
                monitor: HardwareMonitor | None) -> tuple:
    """(model, checkpoint info): a fresh model, with the trained weights where a checkpoint exists."""
    on_gpu = args.device.type == "cuda"
    lm = TransformerLM(spec.dims, spec.num_layers, moe=spec.moe, use_kernels=on_gpu, device=args.device,
                       dtype=torch.bfloat16 if on_gpu else torch.float32, seed=args.seed)
    checkpoint = load_weights(lm, spec, args.checkpoint_dir)
    if spec.name == "transformer_ttt":
        return TTTLanguageModel(lm, args.ttt_update_frequency, args.ttt_chunk_size, args.energy_aware_lr,
                                args.muon_enabled), checkpoint
    if spec.name == "moe_energy_aware":
        use_energy_aware_router(lm, cost_model, objective_weights=args.objective_weights,
                                ttt_update_frequency=args.ttt_update_frequency, ttt_chunk_size=args.ttt_chunk_size,
                                energy_aware_lr=args.energy_aware_lr, muon_enabled=args.muon_enabled,
                                ttt_gate=True, monitor=monitor, **args.router_keep)
    return lm.eval(), checkpoint


def spec_checkpoint(spec: ModelSpec, checkpoint_dir: Path) -> Path:
    d = spec.dims
    return checkpoint_path(checkpoint_dir, spec.moe, d.d_model, spec.num_layers, d.num_experts, d.top_k, d.d_ff)


def load_weights(lm: TransformerLM, spec: ModelSpec, checkpoint_dir: Path) -> dict:
    path = spec_checkpoint(spec, checkpoint_dir)
    if not path.exists():
        return {"path": str(path), "loaded": False, "reason": f"{NO_CHECKPOINT} (python -m bench.train writes {path})"}
    try:
        meta = load_checkpoint(path, lm)
    except (RuntimeError, KeyError) as exc:  # a checkpoint of other shapes
        return {"path": str(path), "loaded": False, "reason": f"quality not measured: checkpoint unusable ({exc})"}
    return {"path": str(path), "loaded": True, "steps": meta["steps"], "trained_on": meta["corpus"],
            "train_heldout": meta["heldout"], "train_seconds": meta.get("train_seconds")}


def checkpoint_bits_per_byte(spec: ModelSpec, checkpoint_dir: Path) -> float | None:
    """The held-out bits/byte ``bench.train`` recorded in a checkpoint (None without one)."""
    path = spec_checkpoint(spec, checkpoint_dir)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]["heldout"]["bits_per_byte"]

def energy_aware_routers(model: torch.nn.Module) -> list:
    lm = model.lm if isinstance(model, TTTLanguageModel) else model
    return [b.moe.gate for b in lm.blocks if lm.moe and isinstance(b.moe.gate, EnergyAwareTTTRouter)]


def reset_ttt_stats(model: torch.nn.Module) -> None:
    if isinstance(model, TTTLanguageModel):
        model.reset_stats()
    for router in energy_aware_routers(model):
        router.reset_stats()


def ttt_summary(model: torch.nn.Module) -> dict | None:
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

    def __init__(self, device: torch.device, rank: int):
        self.device, self.rank = device, rank
        self.on_gpu = device.type == "cuda"
        self.meter = self.sampler = self.idle_power_w = self.copy_bytes_per_s = None
        self.energy_reason = NO_GPU if not torch.cuda.is_available() else f"running on the CPU (--device {device})"
        if self.on_gpu:
            self.meter = meter_for_cuda_device(device.index)
            self.energy_reason = None if self.meter.available else self.meter.unavailable_reason
            self.copy_bytes_per_s = copy_bandwidth_bytes_per_s(device)

    @property
    def metered(self) -> bool:
        return self.meter is not None and self.meter.available

    def start(self) -> None:
        if self.metered:
            self.idle_power_w = measure_idle_power_w(self.meter)
            self.sampler = BackgroundSampler(self.meter, SAMPLE_INTERVAL_S).start()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def samples_between(self, t0: float, t1: float) -> list:
        return [s for s in (self.sampler.samples if self.sampler else []) if t0 <= s.time_s <= t1]


def time_calls_ms(fn: Callable[[], object], runs: int, on_gpu: bool, back_to_back: bool) -> list:
    """Per-call latency over ``runs`` timings: CUDA events around ``CALLS_PER_TIMING`` back-to-back
    calls (graph replays: the device's time per step), each call waited for (eager: what a caller
    waits), or ``perf_counter`` on a CPU."""
    if not on_gpu:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    if not back_to_back:
        return event_times_ms(fn, runs)

    def calls() -> None:
        for _ in range(CALLS_PER_TIMING):
            fn()
    return [t / CALLS_PER_TIMING for t in event_times_ms(calls, runs)]


def kernel_time_ms(fn: Callable[[], object], on_gpu: bool) -> tuple:
    """(GPU time of the kernels and copies one call launches, by the profiler; why not)."""
    if not on_gpu:
        return None, "the profiler's kernel times need a CUDA device"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    if device_us <= 0:
        return None, "the profiler recorded no kernels"
    return device_us / PROFILED_CALLS / 1e3, None


def measure_phase(env: DeviceEnv, model: torch.nn.Module, step: Callable[[], object], tokens_per_call: int,
                  args: argparse.Namespace, mode: str) -> dict:
    """Latency, kernel time, throughput, memory, TTT updates and (on a metered GPU) energy of ``step``."""
    if env.on_gpu:
        torch.cuda.reset_peak_memory_stats(env.device)
    with torch.no_grad():
        for _ in range(graphs.WARMUP_CALLS):
            step()
        reset_ttt_stats(model)
        latencies_ms = time_calls_ms(step, args.num_runs, env.on_gpu, back_to_back=mode == "graph")
        kernel_ms, kernel_reason = kernel_time_ms(step, env.on_gpu)
    median_ms = statistics.median(latencies_ms)
    entry = {"mode": mode, "tokens_per_call": tokens_per_call, "latency_ms_median": median_ms,
             "latency_ms_mean": statistics.mean(latencies_ms),
             "latency_ms_std": statistics.stdev(latencies_ms) if len(latencies_ms) > 1 else 0.0,
             "latency_runs": len(latencies_ms),
             "timer": ("cuda_events, back-to-back replays" if mode == "graph" else "cuda_events") if env.on_gpu
             else "perf_counter",
             "throughput_tokens_per_s": tokens_per_call / (median_ms * 1e-3),
             "kernel_gpu_ms": kernel_ms, "host_overhead_fraction": None if kernel_ms is None else
             max(0.0, 1.0 - kernel_ms / median_ms), "host_overhead_reason": kernel_reason,
             "ttt": ttt_summary(model), "ttt_update_mode": graphs.update_mode(step)}
    if entry["ttt"] is not None:  # the updates ran inside the timed calls: their share of that time
        entry["ttt"]["timed_calls"] = len(latencies_ms) * (CALLS_PER_TIMING if mode == "graph" else 1)
    entry["measured"], entry["measured_reason"] = measure_energy_phase(env, step, tokens_per_call, args.energy_trials,
                                                                       mode)
    return entry | memory_entry(env)


def measure_energy_phase(env: DeviceEnv, fn: Callable[[], object], tokens_per_call: int, trials: int,
                         mode: str) -> tuple:
    """(energy, power and temperature from NVML, None) or (None, why not)."""
    if not env.metered:
        return None, env.energy_reason
    t0 = time.monotonic()
    runner = EagerRunner(fn)  # back-to-back calls of the step (graph replays, or eager calls)
    energy = measure_energy(env.meter, runner.run_for, env.idle_power_w, window_s=1.0, trials=trials)
    samples = env.samples_between(t0, time.monotonic())
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    return {"energy_per_token_j": energy["energy_j"] / tokens_per_call, "energy_per_call_j": energy["energy_j"],
            "energy_per_call_j_min": energy["energy_j_min"], "energy_per_call_j_max": energy["energy_j_max"],
            "power_w": energy["power_w"], "temperature_c_max": max(temps) if temps else None,
            "temperature_c_mean": statistics.mean(temps) if temps else None,
            "slowdown_reasons": slowdown_reasons(env.meter, samples), "calls_per_window": energy["calls_per_window"],
            "window_s": energy["window_s"], "idle_power_w": env.idle_power_w,
            "method": f"NVML energy counter over >= 1 s windows of back-to-back {mode} calls, idle tail removed"}, None


def slowdown_reasons(meter: GpuMeter, samples: list) -> list | None:
    """Thermal/power slowdown reasons seen in any sample (None when NVML gives no clock-event bits)."""
    bits = [s.clock_event_reasons for s in samples if s.clock_event_reasons is not None]
    if not bits:
        return None
    return sorted({name for b in bits for name in meter.slowdown_reasons(b)})


def memory_entry(env: DeviceEnv) -> dict:
    if not env.on_gpu:
        return {"peak_memory_gb": None, "memory_utilisation_pct": None,
                "peak_memory_reason": f"torch.cuda.max_memory_allocated needs a CUDA device ({env.energy_reason})"}
    peak = torch.cuda.max_memory_allocated(env.device)
    total = torch.cuda.get_device_properties(env.device).total_memory
    return {"peak_memory_gb": peak / 1e9, "memory_utilisation_pct": 100.0 * peak / total}


def text_rows(text: torch.Tensor, rows: int, length: int, device: torch.device) -> torch.Tensor:
    """[rows, length] int64 windows of held-out ``text`` (uint8), consecutive, wrapping around."""
    if len(text) <= length:
        text = text.repeat(length // max(1, len(text)) + 2)
    starts = [(i * length) % (len(text) - length) for i in range(rows)]
    return torch.stack([text[s:s + length] for s in starts]).to(device, torch.long)


def forward_phase(env: DeviceEnv, model: torch.nn.Module, text: torch.Tensor, args: argparse.Namespace, cost: tuple,
                  spec: ModelSpec, mode: str) -> dict:
    tokens = text_rows(text, args.batch_size, args.seq_length, env.device)
    entry = {"batch_size": args.batch_size, "seq_length": args.seq_length}
    step = graphs.forward_step(model, tokens, mode)
    entry |= measure_phase(env, model, step, tokens.numel(), args, mode)
    entry["prediction"] = predict(*cost, model.cost_plan(args.batch_size), PLAN_EXCLUDES[spec.name], entry)
    return entry


def decode_phase(env: DeviceEnv, model: torch.nn.Module, text: torch.Tensor, batch_size: int,
                 args: argparse.Namespace, cost: tuple, spec: ModelSpec, mode: str) -> dict:
    """Decode steps at ``batch_size``: the cache holds seq_length // 2 prompt positions and every
    step is rewound to re-decode the next one, so each step attends to the same context length."""
    context = args.seq_length // 2
    prompt = text_rows(text, batch_size, context + 1, env.device)
    step = graphs.decode_step(model, prompt[:, :context], prompt[:, context:], mode)
    entry = {"batch_size": batch_size, "context": context}
    entry |= measure_phase(env, model, step, batch_size, args, mode)
    excludes = PLAN_EXCLUDES[spec.name] + DECODE_PLAN_EXCLUDES
    entry["prediction"] = predict(*cost, model.decode_cost_plan(batch_size), excludes, entry)
    entry["weight_read_floor"] = weight_read_floor(env, model, prompt[:, context:], entry["latency_ms_median"])
    return entry


def measure_quality(model: torch.nn.Module, checkpoint: dict, streams: list, args: argparse.Namespace) -> dict:
    if not checkpoint["loaded"]:
        return {"bits_per_byte": None, "perplexity": None, "reason": checkpoint["reason"]}
    reset_ttt_stats(model)
    quality = evaluate(model, streams, args.seq_length, args.device)
    return quality | {"ttt": ttt_summary(model), "method": "longest held-out stdlib files, front to back in "
                      "windows of seq_length (each its own context), one window per eager forward"}


def measure_mode(env: DeviceEnv, spec: ModelSpec, args: argparse.Namespace, cost: tuple, text: torch.Tensor,
                 monitor: HardwareMonitor | None, mode: str) -> dict:
    """A fresh model's forward and decode phases in one mode."""
    model, _ = build_model(spec, args, cost[0], monitor)
    _progress(env, f"{spec.name}: forward ({mode})")
    out = {"forward": forward_phase(env, model, text, args, cost, spec, mode), "decode": []}
    for batch_size in args.decode:
        _progress(env, f"{spec.name}: decode B={batch_size} ({mode})")
        out["decode"].append(decode_phase(env, model, text, batch_size, args, cost, spec, mode))
    del model
    if env.on_gpu:
        torch.cuda.empty_cache()  # graph pools and caches of the last model
    return out


def benchmark_model(spec: ModelSpec, env: DeviceEnv, args: argparse.Namespace, cost: tuple, text: torch.Tensor,
                    streams: list, monitor: HardwareMonitor | None) -> dict:
    _progress(env, f"{spec.name}: quality")
    model, checkpoint = build_model(spec, args, cost[0], monitor)
    entry = {"description": DESCRIPTIONS[spec.name], "dims": spec.dims.__dict__ | {"num_layers": spec.num_layers},
             "parameters": model.parameter_counts(), "checkpoint": checkpoint,
             "quality": measure_quality(model, checkpoint, streams, args), "cost_model": cost[1]}
    del model  # fresh models below: quality's test-time updates undone
    modes = args.modes
    entry |= measure_mode(env, spec, args, cost, text, monitor, modes[0]) | {"mode": modes[0]}
    for mode in modes[1:]:
        entry[f"{mode}_comparison"] = measure_mode(env, spec, args, cost, text, monitor, mode)
    return entry


def _progress(env, what):
    print(f"[rank {env.rank}] {what}", file=sys.stderr, flush=True)


def run_device(env: DeviceEnv, args: argparse.Namespace, specs: list, costs: dict, text: torch.Tensor,
               streams: list) -> dict:
    """This rank's entry: every model on its device, and the NVML throttle record of the whole run."""
    env.start()
    uses_router = any(s.name == "moe_energy_aware" for s in specs)
    monitor = HardwareMonitor(meter=env.meter).start() if env.metered and uses_router else None
    try:
        models = {s.name: benchmark_model(s, env, args, costs[s.name], text, streams, monitor) for s in specs}
    finally:
        if monitor is not None:
            monitor.stop()
        env.stop()
    return device_header(env) | {"models": models, "throttling": throttling(env)}


def device_header(env: DeviceEnv) -> dict:
    header = {"rank": env.rank, "device": str(env.device), "energy_measured": env.metered,
              "energy_reason": env.energy_reason, "idle_power_w": env.idle_power_w}
    if env.on_gpu:
        props = torch.cuda.get_device_properties(env.device)
        header |= {"gpu_name": props.name, "memory_total_gb": props.total_memory / 1e9,
                   "l2_cache_bytes": getattr(props, "L2_cache_size", None), "copy_bytes_per_s": env.copy_bytes_per_s,
                   "nvml_index": env.meter.device_index, "gpu_uuid": env.meter.uuid(),
                   "driver": env.meter.driver_version()}
    return header


def throttling(env: DeviceEnv) -> dict:
    if not env.metered:
        return {"observed": None, "reason": env.energy_reason}
    reasons = slowdown_reasons(env.meter, env.sampler.samples)
    if reasons is None:
        return {"observed": None, "reason": "NVML gave no clock-event bits"}
    return {"observed": bool(reasons), "reasons": reasons, "samples": len(env.sampler.samples),
            "source": "NVML clock-event bits (thermal or power slowdown), sampled every "
                      f"{SAMPLE_INTERVAL_S} s over the whole run"}
