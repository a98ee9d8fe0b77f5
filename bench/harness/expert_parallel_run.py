"""The expert-parallel ``FusedMoE`` benchmark's run (``torchrun -m bench.ep_benchmark``): the layers,
their timing and energy on every rank, the bytes each token sends, the energy-aware router on the
exact exchange, the weak-scaling efficiency and the results document rank 0 writes."""
import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from bench.harness.costs import NO_GPU
from bench.harness.distributed import slowest, summed
from bench.kernels import rel_error
from bench.moe_cases import MoeShape, layer_weights
from calibration.collectives import calls_per_window, collective_energy
from calibration.energy import measure_idle_power_w
from calibration.nvml_meter import meter_for_cuda_device
from calibration.priors import prior_table
from calibration.results import provenance, write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel, load_table
from costmodel.ops import ModelDims
from kernels.expert_parallel import plan_dispatch
from router.energy_router import EnergyAwareTTTRouter

CPU_SHAPE = MoeShape("tiny", 8, 2, 32, 24, True)
BF16_REL_TOL = 1e-2  # the tests' bf16 tolerance (tests/conftest.py)
NOT_EXACT = ("the energy-aware router runs on the exact exchange (--modes exact): the fixed-size one sends "
             "the same bytes whatever the routing")


# ---- the layers -----------------------------------------------------------------------------------

def layers(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """(single-GPU layer with all experts, expert-parallel layer with this rank's slice of them)."""
    router_weight, gate_up, down = layer_weights(args.shape, device, dtype, args.seed)
    per_rank = args.shape.E // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    whole = kernels.FusedMoE(kernels.TopKRouter(router_weight, args.shape.K, args.shape.renormalize), gate_up, down)
    sharded = kernels.FusedMoE(kernels.TopKRouter(router_weight, args.shape.K, args.shape.renormalize),
                               gate_up[mine].clone(), down[mine].clone(), process_group=dist.group.WORLD)
    return whole, sharded


def energy_aware_router(args: argparse.Namespace, sharded: kernels.FusedMoE, rank: int, world_size: int,
                        dtype: torch.dtype, quality_weight: float) -> tuple:
    """The energy-aware router over the same gate weight, charging remote experts the all_to_all cost.

    Its compute costs are the analytic prior at this layer's dims (labelled so in the results);
    the communication costs are the measured curve of ``--cost_table``."""
    shape = args.shape
    dims = ModelDims(d_model=shape.H, d_ff=shape.I, n_heads=max(1, shape.H // 128), seq_len=1,
                     num_experts=shape.E, top_k=shape.K)
    measured, path = load_table(None if args.cost_table else args.gpu, args.cost_table)
    table = prior_table(args.gpu, dims) | {"collectives": measured.get("collectives", {})}
    with tempfile.TemporaryDirectory() as tmp:
        write_json_atomic(Path(tmp) / "ep_costs.json", table)
        cost_model = KernelCostModel(None, table=Path(tmp) / "ep_costs.json")
    router = EnergyAwareTTTRouter.from_router(
        sharded.gate, cost_model, objective_weights={"energy": 1.0, "latency": 0.0, "quality": quality_weight},
        adapt=False,
        expert_placement=(rank, world_size),
        expert_placement_bytes_per_rank=args.tokens_per_gpu * shape.H * torch.finfo(dtype).bits // 8)
    return router, {"compute_costs": "prior (calibration.priors at the layer's dims)",
                    "communication_costs": f"measured all_to_all curve from {path}"}


# ---- measurement ----------------------------------------------------------------------------------

def meter_env(args: argparse.Namespace, device: torch.device) -> dict:
    if not args.on_gpu:
        return {"meter": None, "energy_reason": NO_GPU if not torch.cuda.is_available() else "--device cpu"}
    meter = meter_for_cuda_device(device.index)
    if not meter.available:
        return {"meter": None, "energy_reason": meter.unavailable_reason}
    return {"meter": meter, "idle_power_w": measure_idle_power_w(meter), "energy_reason": None, "device": device}


def ms_per_call(fn: Callable[[], object], args: argparse.Namespace) -> float:
    """Median over ``--repeats`` batches of back-to-back calls (barrier-aligned), slowest rank."""
    fn()
    times_ms = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if args.on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(args.calls_per_batch):
            fn()
        if args.on_gpu:
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end) / args.calls_per_batch)
        else:
            times_ms.append((time.perf_counter() - t0) * 1e3 / args.calls_per_batch)
    return slowest(statistics.median(times_ms))


def energy_per_call(env: dict, fn: Callable[[], object], latency_ms: float, args: argparse.Namespace) -> tuple:
    """(every GPU's energy (J) for one call of ``fn`` on every rank, summed, with its spread; None), or
    (None, why not)."""
    if env["meter"] is None:
        return None, env["energy_reason"]
    device, rng = env["device"], random.Random(args.seed + dist.get_rank())
    calls = calls_per_window(fn, latency_ms, args.window_s, None, device, True)
    return collective_energy(fn, calls, env["meter"], env["idle_power_w"], args.window_s, None, device, True,
                             args.trials, rng), None


def traffic_bytes_per_token(layer: kernels.FusedMoE, x: torch.Tensor, rank: int, world_size: int,
                            dtype: torch.dtype) -> dict:
    """Bytes this rank's tokens send to other GPUs per token: dispatch (row + ids/weights) and combine.
    The exact exchange sends each token once per other rank it needs; the fixed-size one sends all
    ``ep_capacity`` rows to every other rank."""
    row_bytes = x.shape[1] * torch.finfo(dtype).bits // 8
    tokens = max(x.shape[0], 1)
    with torch.no_grad():
        _, weights, ids = layer.gate(x)
    if layer.ep_capacity is not None:
        remote_rows = (world_size - 1) * layer.ep_capacity
        ranks_per_token = world_size * layer.ep_capacity / tokens
    else:
        counts = plan_dispatch(ids, weights, layer.experts.gate_up_proj.shape[0], world_size).send_counts.tolist()
        remote_rows, ranks_per_token = sum(counts) - counts[rank], sum(counts) / tokens
    return {"dispatch": remote_rows * (row_bytes + 2 * ids.shape[1] * 4) / tokens,
            "combine": remote_rows * row_bytes / tokens, "ranks_per_token": ranks_per_token}


def mean_bytes_per_token(layer: kernels.FusedMoE, x: torch.Tensor, rank: int, world_size: int,
                         dtype: torch.dtype) -> dict:
    """``traffic_bytes_per_token`` averaged over the ranks."""
    return {k: _mean(v) for k, v in traffic_bytes_per_token(layer, x, rank, world_size, dtype).items()}


def measure_layer(env: dict, fn: Callable[[], object], tokens_total: int, args: argparse.Namespace) -> dict:
    latency_ms = ms_per_call(fn, args)
    energy, reason = energy_per_call(env, fn, latency_ms, args)
    return {"latency_ms": latency_ms, "tokens_per_s": tokens_total / (latency_ms * 1e-3),
            "energy_j_per_token": None if energy is None else energy["energy_j"] / tokens_total,
            "energy_all_gpus_per_call": energy, "energy_reason": reason}


def measure_graphed(env: dict, fn: Callable[[], object], reference: torch.Tensor, tokens_total: int,
                    args: argparse.Namespace) -> dict:
    """``measure_layer`` of ``fn`` replayed from a CUDA graph (captured after a warm-up on a side
    stream), with its output checked against ``reference``; skipped without a GPU."""
    if not args.on_gpu:
        return {"skipped": "CUDA graphs need a GPU"}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    entry = measure_layer(env, graph.replay, tokens_total, args)
    return entry | {"rel_l2_error_vs_single_gpu": slowest(rel_error(out, reference)), "cuda_graph": True}


def _mean(value: float) -> float:
    return summed(value) / dist.get_world_size()


# ---- the run --------------------------------------------------------------------------------------

def run(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> dict:
    """Every measurement of the benchmark on this rank (the collectives in it keep the ranks in step)."""
    dtype = torch.bfloat16 if args.on_gpu else torch.float32
    env = meter_env(args, device)
    whole, sharded = layers(args, rank, world_size, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x = torch.randn(args.tokens_per_gpu, args.shape.H, generator=gen, device=device).to(dtype)
    tokens_total = world_size * args.tokens_per_gpu
    with torch.inference_mode():
        reference = whole(x)
        results = {"correctness": {"tolerance": BF16_REL_TOL if dtype == torch.bfloat16 else 1e-5}}
        results["single_gpu"] = measure_layer(env, lambda: whole(x), tokens_total, args) | {
            "note": "all E experts on each GPU, every GPU at once: J/token over all GPUs' tokens"}
        results["single_gpu_graph"] = measure_graphed(env, lambda: whole(x), reference, tokens_total, args)
        results |= expert_parallel_results(args, env, sharded, x, reference, rank, world_size, dtype)
        measured = [name for name, e in results.items() if name.startswith("ep_") and "latency_ms" in e]
        results["correctness"]["rel_l2_error_max_over_ranks"] = max(
            results[name]["rel_l2_error_vs_single_gpu"] for name in measured)
        exact = {name: results[name] for name in measured if results[name]["exchange"] == "exact"}
        results |= energy_aware_results(args, env, sharded, x, exact, rank, world_size, dtype)
    results["weak_scaling"] = weak_scaling(results, measured)
    return results


def expert_parallel_results(args: argparse.Namespace, env: dict, sharded: kernels.FusedMoE, x: torch.Tensor,
                            reference: torch.Tensor, rank: int, world_size: int, dtype: torch.dtype) -> dict:
    """{``ep_<mode>_chunks<n>``: entry}: plain top-k for each ``--modes`` exchange at each ``--chunks``."""
    tokens_total = world_size * args.tokens_per_gpu
    results = {}
    for mode in args.modes:
        for chunks in args.chunks:
            sharded.ep_chunks, sharded.ep_capacity = chunks, None if mode == "exact" else args.tokens_per_gpu
            name = f"ep_{mode}_chunks{chunks}"
            if mode == "fixed_graph":
                results[name] = measure_graphed(env, lambda: sharded(x), reference, tokens_total, args)
            else:
                results[name] = measure_layer(env, lambda: sharded(x), tokens_total, args) | {
                    "rel_l2_error_vs_single_gpu": slowest(rel_error(sharded(x), reference))}
            results[name] |= {"exchange": mode, "ep_chunks": chunks,
                              "bytes_per_token": mean_bytes_per_token(sharded, x, rank, world_size, dtype)}
    return results


def energy_aware_results(args: argparse.Namespace, env: dict, sharded: kernels.FusedMoE, x: torch.Tensor,
                         exact: dict, rank: int, world_size: int, dtype: torch.dtype) -> dict:
    """{``ep_energy_aware_q<q>``: entry} per ``--quality_weights``, on the fastest of the ``exact``
    exchange's entries, or skipped with the reason."""
    if exact:
        best_exact = max(exact.values(), key=lambda entry: entry["tokens_per_s"])
        sharded.ep_chunks, sharded.ep_capacity = best_exact["ep_chunks"], None
        plain = sharded(x)
    results = {}
    for quality_weight in args.quality_weights:
        results[f"ep_energy_aware_q{quality_weight:g}"] = \
            {"skipped": "one GPU: every expert is local, nothing to keep local"} if world_size == 1 else \
            {"skipped": NOT_EXACT} if not exact else \
            energy_aware_run(args, env, sharded, x, plain, rank, world_size, dtype, quality_weight)
    return results


def energy_aware_run(args: argparse.Namespace, env: dict, sharded: kernels.FusedMoE, x: torch.Tensor,
                     plain_out: torch.Tensor, rank: int, world_size: int, dtype: torch.dtype,
                     quality_weight: float) -> dict:
    plain_router = sharded.gate
    try:
        router, costs = energy_aware_router(args, sharded, rank, world_size, dtype, quality_weight)
    except ValueError as exc:  # no all_to_all curve for this GPU count: nothing measured to charge
        return {"skipped": f"no communication cost to charge: {exc}"}
    sharded.gate = router
    try:
        out = sharded(x)
        entry = measure_layer(env, lambda: sharded(x), world_size * args.tokens_per_gpu, args)
        entry["bytes_per_token"] = mean_bytes_per_token(sharded, x, rank, world_size, dtype)
        stats = router.stats()
        entry |= {"costs": costs, "quality_weight": quality_weight,
                  "rerouted_fraction": _mean(stats["rerouted_fraction"]),
                  "output_change_rel_l2_vs_topk": slowest(rel_error(out, plain_out))}
    finally:
        sharded.gate = plain_router
    return entry


def weak_scaling(results: dict, measured: list) -> dict:
    """Efficiency = EP tokens/s / (N x single-GPU tokens/s): the fastest EP configuration against the
    fastest single-GPU one, and per execution mode (eager against eager, graphs against graphs)."""
    def best(names: list[str]) -> str | None:
        names = [name for name in names if "latency_ms" in results[name]]
        return max(names, key=lambda name: results[name]["tokens_per_s"]) if names else None

    def efficiency(ep: str | None, single: str | None) -> float | None:
        return None if ep is None or single is None else results[ep]["tokens_per_s"] / results[single]["tokens_per_s"]
    graphed = [name for name in measured if results[name]["exchange"] == "fixed_graph"]
    eager = [name for name in measured if name not in graphed]
    best_ep, best_single = best(measured), best(["single_gpu", "single_gpu_graph"])
    return {"efficiency": efficiency(best_ep, best_single), "best_ep": best_ep, "best_single_gpu": best_single,
            "eager_efficiency": efficiency(best(eager), "single_gpu"),
            "graph_efficiency": efficiency(best(graphed), best(["single_gpu_graph"]))}


def results_document(args: argparse.Namespace, world_size: int, results: dict) -> dict:
    """What rank 0 writes to ``--output``: the results with the run's provenance and parameters."""
    return {"schema": 1, "provenance": provenance(), "world_size": world_size, "shape": asdict(args.shape),
            "tokens_per_gpu": args.tokens_per_gpu, "parameters": {k: v for k, v in vars(args).items() if k != "shape"},
            "results": results}
