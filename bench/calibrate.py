"""``python -m bench.calibrate --gpu H100``: measure every op's energy and latency on this GPU.

Sweeps each op the cost model knows (``costmodel.ops.OPS``, run on our kernels in bf16) over
log-spaced batch sizes; each point is CUDA-graph replays in energy windows of at least 1 s on the
NVML counter (``calibration.energy``), with CUDA-event latency. It also measures idle power, the
matmul and copy ceilings, and fits the first-order thermal model to the timeline the sweep itself
heated. The table goes to ``calibration/tables/<gpu>.json`` atomically, with its provenance.
No GPU setting is changed. Memory-pressure curves are not calibrated yet (the cost model applies
its roofline bandwidth-share model and the table says so).
"""
import argparse
import re
import statistics
import sys
import time
from dataclasses import asdict

import torch

from bench._results import provenance, write_json_atomic
from calibration.energy import cuda_graph_runner, measure_energy, measure_idle_power_w
from calibration.nvml_meter import BackgroundSampler, GpuMeter
from calibration.thermal import fit_thermal_model
from costmodel.kernel_cost_model import TABLE_DIR
from costmodel.ops import OPS, SEQUENCE_OPS, ModelDims, work

TOKEN_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
SEQUENCE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def gpu_matches(requested, detected_name):
    """Does ``--gpu`` (e.g. "A100") name the detected GPU (e.g. "NVIDIA A100-SXM4-80GB")?"""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(requested)}(?![0-9])", detected_name, re.IGNORECASE) is not None


def op_callable(op, batch_size, dims, device="cuda", dtype=torch.bfloat16, seed=0):
    """A no-argument, graph-capturable call of our kernel for ``op`` at ``batch_size``, on random data."""
    import kernels
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
    H, I, E, K = dims.d_model, dims.d_ff, dims.num_experts, dims.top_k
    if op in SEQUENCE_OPS:
        q, k, v = (randn(batch_size, dims.n_heads, dims.seq_len, dims.head_dim) for _ in range(3))
        if op == "attention_qk":
            return lambda: kernels.attention_qk(q, k)
        if op == "attention_av":
            scores = kernels.attention_qk(q, k)
            return lambda: kernels.attention_av(scores, v, causal=True)
        return lambda: kernels.flash_attention(q, k, v, causal=True)
    x = randn(batch_size, H)
    gate_up, down = randn(2 * I, H, scale=H ** -0.5), randn(H, I, scale=I ** -0.5)
    calls = {
        "ffn_gate": lambda: kernels.ffn_gate(x, gate_up), "ffn_up": lambda: kernels.ffn_up(x, gate_up),
        "swiglu_gate_up": lambda: kernels.swiglu_gate_up(x, gate_up),
        "swiglu_ffn": lambda: kernels.swiglu_ffn(x, gate_up, down),
    }
    if op in calls:
        return calls[op]
    if op == "ffn_down":
        h = randn(batch_size, I)
        return lambda: kernels.ffn_down(h, down)
    router = kernels.TopKRouter(randn(E, H), K)
    if op == "moe_router":
        return lambda: router(x)
    gate_up_e, down_e = randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5)
    with torch.no_grad():
        _, weights, ids = router(x)
    return lambda: kernels.fused_experts(x, gate_up_e, down_e, ids, weights, validate_ids=False)


def measure_ceilings():
    """Measured bf16 matmul FLOP/s and device copy bytes/s (read + write), for the roofline split."""
    from bench.kernels import copy_bytes_per_s, median_ms
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (median_ms(lambda: a @ a) * 1e-3), copy_bytes_per_s()


def thermal_section(samples, thresholds):
    """Fit the thermal model to the sweep's timeline; clock-vs-temperature points; what is extrapolated."""
    usable = [s for s in samples if s.temperature_c is not None and (s.power_average_w or s.power_instant_w)]
    times = [s.time_s for s in usable]
    powers = [s.power_average_w or s.power_instant_w for s in usable]
    temps = [s.temperature_c for s in usable]
    model = fit_thermal_model(times, powers, temps)
    by_temp = {}
    for s in usable:
        if s.sm_clock_mhz is not None:
            by_temp.setdefault(int(s.temperature_c), []).append(s.sm_clock_mhz)
    return asdict(model) | {
        "clock_vs_temp": [{"temp_c": t, "sm_clock_mhz": statistics.median(c)} for t, c in sorted(by_temp.items())],
        "max_observed_c": max(temps), "slowdown_temp_c": thresholds["slowdown"],
        "shutdown_temp_c": thresholds["shutdown"],
        "extrapolated_above_c": max(temps),
        "note": "clock behaviour above max_observed_c (up to the NVML slowdown threshold) is an extrapolation",
    }


def sweep_point(op, batch_size, dims, meter, idle_power_w, window_s, trials):
    run_for, latency_ms = cuda_graph_runner(op_callable(op, batch_size, dims))
    energy = measure_energy(meter, run_for, idle_power_w, window_s=window_s, trials=trials)
    flops, nbytes = work(op, batch_size, dims)
    return {"batch_size": batch_size, "latency_ms": latency_ms, "flops": flops, "bytes": nbytes,
            "memory_gb": nbytes / 1e9} | energy


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", required=True, help="the GPU this table is for, e.g. H100 or A100")
    for name, default in asdict(ModelDims()).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--window_s", type=float, default=1.0, help="energy window (>= 1 s)")
    parser.add_argument("--trials", type=int, default=2, help="windows per point (median and spread)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the ops")
    parser.add_argument("--output", default=None, help="default: calibration/tables/<gpu>.json")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.gpu):
        parser.error(f"--gpu must be a short name such as H100, got {args.gpu!r}")
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
    try:
        args.dims = ModelDims(**{k: getattr(args, k) for k in asdict(ModelDims())})
    except ValueError as exc:
        parser.error(str(exc))
    return parser, args


def check_gpu(parser, requested, meter):
    if not torch.cuda.is_available():
        parser.error("no NVIDIA GPU detected (torch.cuda.is_available() is False): calibration measures a GPU")
    if not meter.available:
        parser.error(f"cannot read the GPU's energy: {meter.unavailable_reason}")
    detected = meter.name()
    if not gpu_matches(requested, detected):
        parser.error(f"--gpu {requested} does not match the detected GPU {detected!r}")
    return detected


def main(argv=None):
    parser, args = parse_args(argv)
    meter = GpuMeter(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    detected = check_gpu(parser, args.gpu, meter)
    ops = args.ops.split(",")
    peak_flops, copy_bytes_per_s = measure_ceilings()
    time.sleep(5.0)  # let the card settle before reading idle power
    idle_power_w = measure_idle_power_w(meter)
    points = {op: [] for op in ops}
    plan = [(op, b) for op in ops for b in (SEQUENCE_BATCHES if op in SEQUENCE_OPS else TOKEN_BATCHES)]
    started = time.monotonic()
    with BackgroundSampler(meter, interval_s=0.1) as sampler:
        for n, (op, batch_size) in enumerate(plan, 1):
            points[op].append(sweep_point(op, batch_size, args.dims, meter, idle_power_w, args.window_s, args.trials))
            p = points[op][-1]
            print(f"[{n:3d}/{len(plan)}] {op:16} batch {batch_size:5d}: {p['latency_ms']:9.4f} ms "
                  f"{p['energy_j']:.3e} J/call ({time.monotonic() - started:5.0f} s)", file=sys.stderr, flush=True)
    table = {
        "schema": 1, "gpu": args.gpu, "source": "measured", "gpu_name": detected,
        "provenance": provenance() | {"driver": meter.driver_version()},
        "dims": asdict(args.dims), "idle_power_w": idle_power_w,
        "peak_flops": peak_flops, "hbm_bytes_per_s": copy_bytes_per_s,
        "method": {"window_s": args.window_s, "trials": args.trials, "dtype": "bfloat16",
                   "energy": "NVML total-energy counter, edge-aligned windows of CUDA-graph replays"},
        "thermal": thermal_section(sampler.samples, meter.temperature_thresholds_c()),
        "memory_pressure": None,
        "memory_pressure_missing_reason": "not calibrated yet: the cost model applies its roofline bandwidth-share model",
        "ops": {op: {"unit": "sequences" if op in SEQUENCE_OPS else "tokens", "points": pts}
                for op, pts in points.items()},
    }
    output = args.output or TABLE_DIR / f"{args.gpu}.json"
    write_json_atomic(output, table)
    print(f"wrote {output} ({len(plan)} points in {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
