"""Latency and energy of a collective over a process group, per message size.

``all_to_all`` is ``torch.distributed.all_to_all_single`` with even splits, expert parallelism's
exchange: every rank sends its whole send buffer of ``bytes_per_rank`` (bf16 random data, as
tokens are), ``bytes_per_rank / world_size`` to each rank, and receives as much.

Latency: after warm-up each rank times calls that start together (a barrier before each): CUDA
events on a GPU, ``time.perf_counter`` without one. The median per rank, and the slowest rank's
median (all_reduce MAX), is the op's latency.

Energy: the op runs on every GPU at once, so every rank reads its own GPU's NVML counter over the
same windows (``calibration.energy``'s edge-aligned method) and the energies add up (all_reduce
SUM): the op's energy across all participating GPUs. A collective needs the same number of calls
on every rank, so each window's call count comes from a timed probe of back-to-back calls, agreed
with MAX (and raised, all trials again, if a window still ends short of ``window_s`` on any rank).
A window: counter edge -> barrier -> N calls -> device sync -> next counter edge;
the time before the barrier returns (waiting for the other ranks' edges) and the tail after the
work are charged at that GPU's idle power and subtracted. Without a GPU or NVML (gloo on CPU) the
energy fields are None and ``energy_missing_reason`` says why.
"""
import math
import numbers
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from calibration.energy import (check_idle_power_w, check_window_s, event_times_ms, measure_idle_power_w,
                                wait_for_counter_update)
from calibration.nvml_meter import meter_for_cuda_device
from calibration.validate import check_meter
from costmodel.ops import BYTES_PER_ELEMENT
from costmodel.validate import count

if TYPE_CHECKING:  # annotations only: no import at run time
    from torch.distributed import ProcessGroup

    from calibration.nvml_meter import GpuMeter

WARMUP_CALLS = 3
PROBE_S = 0.1  # back-to-back calls timed to size the energy windows


def check_sizes(sizes_bytes: "Sequence[int]", world_size: int) -> "list[int]":
    """The sizes as ints, each a positive number of bytes that splits evenly over ``world_size`` ranks
    in bf16 elements: TypeError for a size that is not an int, ValueError for one that does not split."""
    world_size = count("world_size", world_size)
    if not isinstance(sizes_bytes, (list, tuple)):
        raise TypeError(f"sizes_bytes must be a list of message sizes (ints, bytes), got {type(sizes_bytes).__name__}")
    if not sizes_bytes:
        raise ValueError("sizes_bytes must name at least one message size")
    step = BYTES_PER_ELEMENT * world_size
    rule = f"a positive int multiple of {step} bytes (bf16 elements split evenly over {world_size} ranks)"
    for size in sizes_bytes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"sizes_bytes: each size must be {rule}, got {type(size).__name__} {size!r}")
        if size <= 0 or size % step:
            raise ValueError(f"sizes_bytes: each size must be {rule}, got {size!r}")
    return [int(size) for size in sizes_bytes]


def _check_knobs(window_s, trials, repeats):
    return check_window_s(window_s), count("trials", trials), count("repeats", repeats)


def all_to_all_call(bytes_per_rank: int, group: "ProcessGroup | None", device: torch.device,
                    seed: int = 0) -> "Callable[[], object]":
    """A no-argument call of ``all_to_all_single`` that sends ``bytes_per_rank`` of bf16 random data."""
    gen = torch.Generator(device=device).manual_seed(seed + dist.get_rank(group))
    send = torch.randn(bytes_per_rank // BYTES_PER_ELEMENT, generator=gen, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    return lambda: dist.all_to_all_single(recv, send, group=group)


def _sync(on_gpu):
    if on_gpu:
        torch.cuda.synchronize()


def all_reduce_floats(values: "Sequence[float]", op: "dist.ReduceOp", group: "ProcessGroup | None",
                      device: "torch.device | str") -> "list[float]":
    """``values`` (floats) reduced over the group with ``op``, as floats (``device``: where the
    backend reduces, a CUDA device for NCCL)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def _timed_ms(call, on_gpu):
    if on_gpu:
        return event_times_ms(call, 1)[0]
    start = time.perf_counter()
    call()  # gloo's blocking collective returns when its data has arrived
    return (time.perf_counter() - start) * 1e3


def _latency_ms(call, group, device, on_gpu, repeats):
    """The slowest rank's median time of a call started together on every rank."""
    for _ in range(WARMUP_CALLS):
        call()
    _sync(on_gpu)
    times_ms = []
    for _ in range(repeats):
        dist.barrier(group=group)  # a late peer's start would otherwise count as the op's time
        times_ms.append(_timed_ms(call, on_gpu))
    return all_reduce_floats([statistics.median(times_ms)], dist.ReduceOp.MAX, group, device)[0]


def _run_calls(call, calls, on_gpu):
    for _ in range(calls):
        call()
    _sync(on_gpu)


def calls_per_window(call: "Callable[[], object]", latency_ms: float, window_s: float, group: "ProcessGroup | None",
                     device: torch.device, on_gpu: bool) -> int:
    """Calls of ``call`` (a collective, or work containing one) that fill ``window_s`` back to back
    (faster than the barrier-separated latency), the same on every rank (MAX)."""
    probe = max(1, math.ceil(PROBE_S * 1e3 / latency_ms))
    dist.barrier(group=group)
    start = time.monotonic()
    _run_calls(call, probe, on_gpu)
    per_call_s = (time.monotonic() - start) / probe
    return int(all_reduce_floats([math.ceil(window_s / per_call_s)], dist.ReduceOp.MAX, group, device)[0])


def _window(call, calls, meter, idle_power_w, group, on_gpu):
    """(energy_j of this rank's GPU for ``calls`` calls, their seconds): edge, barrier, calls, edge."""
    start = wait_for_counter_update(meter)
    dist.barrier(group=group)
    t_ready = time.monotonic()
    _run_calls(call, calls, on_gpu)
    t_end = time.monotonic()
    end = wait_for_counter_update(meter)
    idle_s = (t_ready - start.time_s) + (end.time_s - t_end)  # waiting for the peers' edges, and the tail
    return (end.energy_mj - start.energy_mj) / 1000.0 - idle_power_w * idle_s, t_end - t_ready


def collective_energy(call: "Callable[[], object]", calls: int, meter: "GpuMeter", idle_power_w: float, window_s: float,
                      group: "ProcessGroup | None", device: torch.device, on_gpu: bool, trials: int,
                      rng: random.Random) -> dict:
    """Energy per call (J) of ``call`` run on every rank at once, over all the ranks' GPUs (median, min,
    max over trials), the GPUs' summed power (W), and the calls per window. A window shorter than ``window_s``
    on any rank (the probe overrated the pace) makes every trial start again with more calls. A window
    whose energy is not positive on any rank (its counter ran backwards, or its idle power is too high)
    is a RuntimeError on every rank alike."""
    windows = []
    while len(windows) < trials:
        time.sleep(rng.uniform(0.0, 0.1))  # a random phase against the counter's update period
        energy_j, seconds = _window(call, calls, meter, idle_power_w, group, on_gpu)
        shortest_s, lowest_j = all_reduce_floats([seconds, energy_j], dist.ReduceOp.MIN, group, device)
        if lowest_j <= 0:
            raise RuntimeError(f"a window's energy came out {lowest_j:.6g} J on one rank (this rank: {energy_j:.6g} J, "
                               f"idle power {idle_power_w:g} W): its energy counter ran backwards or its idle power "
                               "is above its power under load; no measurement")
        if shortest_s < window_s:
            calls, windows = math.ceil(calls * 1.1 * window_s / shortest_s), []
            continue
        windows.append((energy_j, energy_j / seconds))
    summed = all_reduce_floats([v for window in windows for v in window], dist.ReduceOp.SUM, group, device)
    per_call_j, power_w = [e / calls for e in summed[0::2]], summed[1::2]
    return {"energy_j": statistics.median(per_call_j), "energy_j_min": min(per_call_j),
            "energy_j_max": max(per_call_j), "power_w": statistics.median(power_w), "calls_per_window": calls}


def _energy_missing_reason(meter, group, device):
    """None when every rank can read its GPU's energy counter, else why not (agreed with MAX)."""
    if meter is None:
        reason = f"no GPU (backend {dist.get_backend(group)}): no energy counter to read"
    elif not meter.available:
        reason = meter.unavailable_reason
    else:
        reading = meter.read()
        reason = None if reading.energy_mj is not None else reading.missing.get("energy_mj")
    if all_reduce_floats([reason is not None], dist.ReduceOp.MAX, group, device)[0]:
        return reason or "another rank cannot read its GPU's energy counter"
    return None


def measure_all_to_all(sizes_bytes: "Sequence[int]", group: "ProcessGroup | None" = None, *, window_s: float = 1.0,
                       trials: int = 2, repeats: int = 20, meter: "GpuMeter | None" = None,
                       idle_power_w: "float | None" = None, seed: int = 0) -> dict:
    """The all_to_all curve over ``group`` (default: the world); every rank calls it alike.

    Args:
        sizes_bytes: message sizes, bytes each rank sends (multiples of 2 * world_size).
        window_s, trials: energy windows (>= 1 s) per size, and how many (median and spread).
        repeats: timed calls per size for the latency.
        meter: this rank's ``GpuMeter`` (default on NCCL: its own GPU's; on gloo: none, no energy).
        idle_power_w: this rank's GPU's idle power, W (default: measured, all ranks idle together).
    Returns:
        {"points": [{bytes_per_rank, world_size, latency_ms, energy_j, energy_j_min, energy_j_max,
        power_w, calls_per_window}, ...], "idle_power_w", "energy_missing_reason", "backend",
        "world_size"}. Energies and power are summed over the ranks' GPUs, per call; they are None
        (``idle_power_w`` too) when any rank cannot read its counter.
    """
    world_size, backend = dist.get_world_size(group), dist.get_backend(group)
    sizes_bytes = check_sizes(sizes_bytes, world_size)
    window_s, trials, repeats = _check_knobs(window_s, trials, repeats)
    if meter is not None:
        check_meter("meter", meter, "available", "unavailable_reason")
    if idle_power_w is not None:
        idle_power_w = check_idle_power_w(idle_power_w)
    on_gpu = backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if meter is None and on_gpu:
        meter = meter_for_cuda_device()
    reason = _energy_missing_reason(meter, group, device)
    if reason is None and idle_power_w is None:
        idle_power_w = measure_idle_power_w(meter)
    rng = random.Random(seed + dist.get_rank(group))
    points = []
    for bytes_per_rank in sizes_bytes:
        call = all_to_all_call(bytes_per_rank, group, device, seed)
        latency_ms = _latency_ms(call, group, device, on_gpu, repeats)
        point = {"bytes_per_rank": bytes_per_rank, "world_size": world_size, "latency_ms": latency_ms}
        if reason is None:
            calls = calls_per_window(call, latency_ms, window_s, group, device, on_gpu)
            point |= collective_energy(call, calls, meter, idle_power_w, window_s, group, device, on_gpu, trials, rng)
        else:
            point |= dict.fromkeys(("energy_j", "energy_j_min", "energy_j_max", "power_w", "calls_per_window"))
        points.append(point)
        del call  # frees the buffers before the next (larger) size
    total_idle_w = None if reason else all_reduce_floats([idle_power_w], dist.ReduceOp.SUM, group, device)[0]
    return {"points": points, "idle_power_w": total_idle_w, "energy_missing_reason": reason, "backend": backend,
            "world_size": world_size}
