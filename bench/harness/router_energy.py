"""The energy-aware router against plain top-k (``python -m bench.router_energy``): one expert's
cost table per shape, the layers and their inputs, the bounded quality, each row's routing figures,
and on a GPU its graph-replay latency, measured energy, router overhead and the test-time updates'
cost, gathered into the results report."""
import argparse
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import kernels
from bench import moe_cases
from bench.kernels import graph_median_ms, rel_error
from calibration.energy import GraphRunner, measure_energy, measure_idle_power_w, median_event_ms, repeat_for
from calibration.nvml_meter import GpuMeter
from calibration.priors import prior_table
from calibration.results import provenance, write_json_atomic
from calibration.sweep import calibrate_ops
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from router import EnergyAwareTTTRouter, HardwareMonitor

QUALITY_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 1e5)
AGGRESSIVE_QUALITY = 1.0
MAX_REROUTED = 0.10
TTT_UPDATE_FREQUENCY = 128
NO_GPU = "no CUDA device: routing ran under the Triton interpreter with a prior table, so times and energy are null"
TARGETS = {"energy_drop_qwen3_T16": "measured energy per token >= 40% below plain top-k at <= 10% re-routed",
           "overhead_us": "router overhead <= 5 us per call against the plain routing"}


def short_gpu_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100' (the name bench.calibrate checks against the card)."""
    match = re.search(r"(?<![A-Za-z0-9])([A-Z]+\d{2,4})(?![0-9])", device_name)
    if match is None:
        raise SystemExit(f"cannot derive a short GPU name from {device_name!r} for bench.calibrate")
    return match.group(1)


def expert_dims(shape: moe_cases.MoeShape) -> ModelDims:
    return ModelDims(d_model=shape.H, d_ff=shape.I, n_heads=4, num_experts=shape.E, top_k=shape.K)


def cost_model_for(shape: moe_cases.MoeShape, workdir: str | Path, timed: bool) -> KernelCostModel:
    """A table with one expert's swiglu_ffn: measured here on a GPU, the analytic prior otherwise."""
    if not timed:
        path = Path(workdir) / f"prior_{shape.name}.json"
        write_json_atomic(path, prior_table("H200", expert_dims(shape)))
        return KernelCostModel("H200", table=path)
    gpu = short_gpu_name(torch.cuda.get_device_name())
    path = Path(workdir) / f"{gpu}_{shape.name}_swiglu_ffn.json"
    calibrate_ops(gpu, ("swiglu_ffn",), expert_dims(shape), path)
    return KernelCostModel(gpu, table=path)


def hidden_states(shape: moe_cases.MoeShape, T: int, device: torch.device | str, dtype: torch.dtype,
                  seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(T, shape.H, generator=gen, device=device).to(dtype)


def energy_router(plain: kernels.TopKRouter, cost_model: KernelCostModel, quality: float,
                  monitor: HardwareMonitor | None, **kwargs: Any) -> EnergyAwareTTTRouter:
    return EnergyAwareTTTRouter.from_router(plain, cost_model, objective_weights={"energy": 1.0, "quality": quality},
                                            monitor=monitor, ttt_update_frequency=TTT_UPDATE_FREQUENCY, **kwargs)


@torch.no_grad()
def bounded_quality(plain: kernels.TopKRouter, cost_model: KernelCostModel, monitor: HardwareMonitor | None,
                    shape: moe_cases.MoeShape, T: int, device: torch.device | str, dtype: torch.dtype,
                    held_out: int) -> float:
    """The smallest quality on the grid whose re-routed fraction over ``held_out`` batches is <= 10%."""
    xs = [hidden_states(shape, T, device, dtype, seed=1000 + n) for n in range(held_out)]
    for quality in QUALITY_GRID:
        router = energy_router(plain, cost_model, quality, monitor, adapt=False)
        for x in xs:
            router(x)
        if router.stats()["rerouted_fraction"] <= MAX_REROUTED:
            return quality
    return math.inf


@torch.no_grad()
def routing_row(plain: kernels.TopKRouter, router: EnergyAwareTTTRouter, layer: kernels.FusedMoE,
                plain_layer: kernels.FusedMoE, x: torch.Tensor) -> dict:
    """Distinct experts, re-routed fraction, output deviation and routing KL of one batch."""
    router.reset_stats()
    logits, _, ids = router(x)
    stats = router.stats()
    plain_ids = plain(x)[2]
    probs = torch.softmax(logits.float(), dim=-1)

    def kl(chosen: torch.Tensor) -> float:  # KL(q_S || p) = -log p(S), token mean
        return (-probs.gather(1, chosen.long()).sum(1).clamp_min(1e-30).log()).mean().item()
    kl_plain, kl_ours = kl(plain_ids), kl(ids)
    return {"distinct_experts": torch.unique(ids).numel(), "plain_distinct_experts": torch.unique(plain_ids).numel(),
            "rerouted_fraction": stats["rerouted_fraction"], "changed_slot_fraction": stats["changed_slot_fraction"],
            "rel_l2_vs_plain": rel_error(layer(x), plain_layer(x)), "kl_plain": kl_plain, "kl": kl_ours,
            "kl_increase": kl_ours - kl_plain}


def sync_free(fn: Callable[[], object]) -> tuple:
    """(True, None) if ``fn()`` runs eagerly without a host sync, else (False, the error)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            fn()
        return True, None
    except RuntimeError as exc:
        return False, str(exc)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measured_layer(layer: kernels.FusedMoE, x: torch.Tensor, meter: GpuMeter, idle_power_w: float,
                   args: argparse.Namespace) -> dict:
    """Graph-replay latency (ms) and measured energy per token (J) of ``layer(x)``; the capture proves no sync."""
    runner = GraphRunner(lambda: layer(x))
    energy = measure_energy(meter, runner.run_for, idle_power_w, window_s=args.window_s, trials=args.trials)
    return {"latency_ms": runner.latency_ms, "layer_energy_j_per_token": energy["energy_j"] / x.shape[0],
            "energy_spread_j_per_token": [energy["energy_j_min"] / x.shape[0], energy["energy_j_max"] / x.shape[0]],
            "power_w": energy["power_w"], "graph_captured": True}


def overhead_us(router: EnergyAwareTTTRouter, plain: kernels.TopKRouter, x: torch.Tensor) -> float:
    """Router forward minus TopKRouter forward, both as CUDA-graph replays (us per call)."""
    with torch.no_grad():
        return (graph_median_ms(lambda: router(x)) - graph_median_ms(lambda: plain(x))) * 1e3


class _StepRunner:
    """``run_for(seconds) -> steps`` of eager TTT updates (they run outside graphs by design)."""

    def __init__(self, router: EnergyAwareTTTRouter) -> None:
        self.router = router

    def run_for(self, seconds: float) -> int:
        steps = repeat_for(self.router.ttt_step, seconds)
        self.router.reset_stats()  # drop the recorded events
        return steps


def ttt_cost(plain: kernels.TopKRouter, cost_model: KernelCostModel, monitor: HardwareMonitor | None,
             shape: moe_cases.MoeShape, device: torch.device | str, dtype: torch.dtype, meter: GpuMeter,
             idle_power_w: float, args: argparse.Namespace) -> dict:
    """Measured energy (J) and time (ms) of one test-time update (offsets' sign step), amortised per token."""
    router = energy_router(plain, cost_model, AGGRESSIVE_QUALITY, monitor)
    with torch.no_grad():
        for n in range(4):
            router(hidden_states(shape, 16, device, dtype, seed=2000 + n))  # a window to learn from
        step_ms = median_event_ms(router.ttt_step, 20)
        energy = measure_energy(meter, _StepRunner(router).run_for, idle_power_w, window_s=args.window_s,
                                trials=args.trials)
    return {"ttt_step_ms": step_ms, "ttt_step_energy_j": energy["energy_j"],
            "ttt_energy_j_per_token": energy["energy_j"] / TTT_UPDATE_FREQUENCY,
            "ttt_update_frequency": TTT_UPDATE_FREQUENCY}


def run_shape(shape: moe_cases.MoeShape, batches: Sequence[int], device: torch.device | str, dtype: torch.dtype,
              timed: bool, workdir: str | Path, monitor: HardwareMonitor | None, meter: GpuMeter | None,
              idle_power_w: float | None, args: argparse.Namespace) -> tuple:
    cost_model = cost_model_for(shape, workdir, timed)
    gate, gate_up, down = moe_cases.layer_weights(shape, device, dtype)
    plain = kernels.TopKRouter(gate, shape.K, renormalize=shape.renormalize).requires_grad_(False)
    plain_layer = kernels.FusedMoE(plain, gate_up, down).requires_grad_(False)
    ttt = ttt_cost(plain, cost_model, monitor, shape, device, dtype, meter, idle_power_w, args) if timed else {}
    rows = []
    for T in batches:
        x = hidden_states(shape, T, device, dtype, seed=T)
        base = {"shape": shape.name, "E": shape.E, "K": shape.K, "H": shape.H, "I": shape.I, "T": T,
                "dtype": str(dtype).removeprefix("torch."), "table_source": cost_model.table["source"]}
        plain_row = base | {"router": "plain", "quality": None}
        if timed:
            plain_row |= measured_layer(plain_layer, x, meter, idle_power_w, args)
            plain_row["energy_j_per_token"] = plain_row["layer_energy_j_per_token"]
        rows.append(plain_row)
        held_out = args.held_out if timed else 2
        for setting, quality in (("bounded", bounded_quality(plain, cost_model, monitor, shape, T, device, dtype,
                                                             held_out)), ("aggressive", AGGRESSIVE_QUALITY)):
            if not math.isfinite(quality):
                rows.append(base | {"router": setting, "quality": None,
                                    "skipped": f"no quality on the grid re-routes <= {MAX_REROUTED:.0%}"})
                continue
            router = energy_router(plain, cost_model, quality, monitor, adapt=False)
            row = base | {"router": setting, "quality": quality, "max_shift": router.max_shift}
            row |= routing_row(plain, router, kernels.FusedMoE(router, gate_up, down), plain_layer, x)
            if timed:  # timed as deployed: no statistics in the hot path
                bare = energy_router(plain, cost_model, quality, monitor, adapt=False, track_stats=False)
                row |= _timed_row(row, plain_row, bare, router, plain, gate_up, down, x, ttt, meter, idle_power_w,
                                  args)
            rows.append(row)
            _progress(row)
    return rows, {"source": cost_model.table["source"], "points": cost_model.table["ops"]["swiglu_ffn"]["points"]}


def _timed_row(row: dict, plain_row: dict, bare: EnergyAwareTTTRouter, router: EnergyAwareTTTRouter,
               plain: kernels.TopKRouter, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, ttt: dict,
               meter: GpuMeter, idle_power_w: float, args: argparse.Namespace) -> dict:
    """Timed figures of the router without statistics (``bare``); overhead also with them (``router``)."""
    layer = kernels.FusedMoE(bare, gate_up, down).requires_grad_(False)
    out = measured_layer(layer, x, meter, idle_power_w, args) | ttt
    out["energy_j_per_token"] = out["layer_energy_j_per_token"] + ttt["ttt_energy_j_per_token"]
    out["energy_drop_vs_plain"] = 1.0 - out["energy_j_per_token"] / plain_row["energy_j_per_token"]
    out["latency_drop_vs_plain"] = 1.0 - out["latency_ms"] / plain_row["latency_ms"]
    out["router_overhead_us"] = overhead_us(bare, plain, x)
    out["router_overhead_us_with_stats"] = overhead_us(router, plain, x)
    out["sync_free_eager"], out["sync_error"] = sync_free(lambda: layer(x))
    if row["shape"] == "qwen3" and row["T"] == 16 and row["router"] == "bounded":
        out["target_energy_drop"] = TARGETS["energy_drop_qwen3_T16"]
        out["target_energy_drop_met"] = out["energy_drop_vs_plain"] >= 0.40 and row["rerouted_fraction"] <= 0.10
    out["target_overhead_met"] = out["router_overhead_us"] <= 5.0
    return out


def _progress(row: dict) -> None:
    print(f"{row['shape']:10} T={row['T']:<4} {row['router']:10} q={row['quality']:<8g} rerouted "
          f"{row['rerouted_fraction']:6.1%} experts {row['plain_distinct_experts']}->{row['distinct_experts']}",
          file=sys.stderr, flush=True)


def run_shapes(shapes: dict[str, moe_cases.MoeShape], batches: Sequence[int], device: torch.device | str,
               dtype: torch.dtype, meter: GpuMeter | None, args: argparse.Namespace) -> dict:
    """The results report of every shape at every batch size: timed, metered and monitored with
    ``meter``, routing figures alone without it."""
    timed = meter is not None
    monitor = HardwareMonitor(meter) if timed else None
    idle_power_w = measure_idle_power_w(meter) if timed else None
    rows, cost_tables = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        if monitor is not None:
            monitor.start()
        try:
            for name, shape in shapes.items():
                shape_rows, cost_tables[name] = run_shape(shape, batches, device, dtype, timed, workdir, monitor,
                                                          meter, idle_power_w, args)
                rows += shape_rows
        finally:
            if monitor is not None:
                monitor.stop()
    return results_report(rows, cost_tables, meter, monitor, idle_power_w, args)


def results_report(rows: list, cost_tables: dict, meter: GpuMeter | None, monitor: HardwareMonitor | None,
                   idle_power_w: float | None, args: argparse.Namespace) -> dict:
    """The rows and the swiglu_ffn tables behind them, with the run's provenance and method."""
    timed = meter is not None
    return {"provenance": provenance() | ({"driver": meter.driver_version()} if timed else {}),
            "timed": timed, "time_null_reason": None if timed else NO_GPU, "idle_power_w": idle_power_w,
            "method": {"window_s": args.window_s, "trials": args.trials, "max_rerouted": MAX_REROUTED,
                       "quality_grid": QUALITY_GRID, "held_out_batches": args.held_out, "targets": TARGETS,
                       "monitor_samples": len(monitor.samples) if monitor else 0},
            "swiglu_ffn_tables": cost_tables, "rows": rows}
