"""The calibration sweep: every op's measured energy and latency on this GPU, as a cost table.

``run_sweep`` measures each op of ``SweepSettings.ops`` (``costmodel.ops.OPS``, on our kernels in
bf16) over log-spaced batch sizes at the table's dims: each point is CUDA-graph replays in energy
windows of at least 1 s on the NVML counter (``calibration.energy``), with CUDA-event latency.
Energy windows are measured at ``ENERGY_TOKEN_BATCHES`` / ``ENERGY_SEQUENCE_BATCHES`` of them; the
other batch sizes are latency-only points (``energy_j`` null), which the tile model's energy fit
carries. Then the same ops at ``SweepSettings.shapes`` (``SHAPE_SWEEP``: larger dims, where weights
stream from HBM and K loops are long): latency at ``SHAPE_TOKEN_BATCHES`` /
``SHAPE_SEQUENCE_BATCHES`` with energy (one window) at each, which the cost model's tile fit
(``costmodel.fit``) needs to carry costs to shapes nobody measured; and at
``SweepSettings.latency_shapes`` (``LATENCY_SHAPES``) the same batch sizes without windows: a
latency point costs a tenth of a metered one, and the shape-general model corrects a modelled
shape's latency from the measured shapes nearest it (``costmodel.curves``), so more shapes buy
more than more windows. The
table records the block configs the kernels read and the card's SM count and L2 size. It also measures idle
power and the matmul and copy ceilings, fits the first-order thermal model to the timeline the
sweep itself heated, and measures each op's memory-pressure curve (``calibration.pressure``).
Every point goes to ``<output>.partial.json`` as it is measured, so an interrupted sweep can
continue; the table is written atomically if it passes ``costmodel.table.check_table``, else to
``<output>.rejected.json``. ``python -m bench.calibrate`` is its command line; ``calibrate_ops``
serves the benchmarks that need a table at their own dims.
"""
import functools
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from calibration.energy import (GraphRunner, check_window_s, measure_energy, measure_gap_power_w, measure_idle_power_w,
                                median_event_ms)
from calibration.nvml_meter import BackgroundSampler, GpuMeter
from calibration.op_calls import op_callable
from calibration.pressure import BandwidthHog, background_utilisation, measure_pressure_curve
from calibration.results import output_path, provenance, write_json_atomic
from calibration.thermal import fit_thermal_model
from calibration.timelines import RunTimelines, timeline_path
from costmodel.ops import OPS, SEQUENCE_OPS, ModelDims, work
from costmodel.table import check_table, load_table
from costmodel.validate import count, finite_number
from kernels.validate import gpu_has_fp8

if TYPE_CHECKING:  # annotations only: no import at run time
    from calibration.nvml_meter import GpuReading

TOKEN_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
SEQUENCE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# energy windows at the table's dims: on the H100's fc91c6b table and five held-out reports, leaving the
# windows at the other three batch sizes out moved held-out batch energy from 2.8% to 2.9% median error, while
# leaving out the sweep shapes' windows at 1 or 256 tokens took the modelled shapes' from 5.2% to 6.7-8.1%
ENERGY_TOKEN_BATCHES = (1, 16, 256, 4096)
ENERGY_SEQUENCE_BATCHES = (1, 4, 16, 64)
# 64 tokens rather than 16: at 1 to 16 a decode GEMM runs one 16-row block (costed from 1 token),
# at 17 to 64 several blocks each read the whole weight, which no point of a long K loop showed the
# fit (on an H100, 48 tokens ran 23-30% over the model at three unswept shapes)
SHAPE_TOKEN_BATCHES = (1, 64, 256, 4096)
SHAPE_SEQUENCE_BATCHES = (1, 4, 16)
# and latency alone at 4 and 16 tokens (a sixth of a window's time): between 1 and 64 tokens the model's ratio was
# interpolated, and held-out shapes at 3 tokens ran 8.1% median, p90 33%, off the H100's 2026-12-07 sweep (a
# 17 MB projection at 3 tokens took 6.8 µs where one of 14 MB at 1 token took 7.9 µs); and at 1024: between 256
# and 4096 tokens the curves bend (a norm's rows leave the one-wave regime, lm_head's tiles fill the SMs), and
# the 2026-12-07 replay's 768-token rows at swept shapes ran -8 to -20% (rms_norm) and +7 to +24% (lm_head);
# and at 32: the step from one 16-row block to several lies between 16 and 64 tokens, and the ninth replay's
# 48-token rows at swept shapes ran 22-26% under curves that bent only after 16 (on the H100, qkv_projection
# at d_model 2560 took 8.5 µs at 16 tokens, 23.6 at 48 and 23.9 at 64)
SHAPE_LATENCY_TOKEN_BATCHES = (4, 16, 32, 1024)
# beyond the harness's dims: 23 and 46 MB projections (inside what a repeated call finds in an H100's or H200's
# 50 MB L2, and beyond it: how fast L2-resident weights stream), a fine-grained MoE, a Mixtral-sized expert
SHAPE_SWEEP = (
    ModelDims(d_model=2048, d_ff=5632, n_heads=16, seq_len=1024, num_experts=8, top_k=2, vocab_size=32000),
    ModelDims(d_model=2048, d_ff=768, n_heads=16, seq_len=2048, num_experts=64, top_k=8, vocab_size=32000),
    ModelDims(d_model=4096, d_ff=14336, n_heads=32, seq_len=1024, num_experts=8, top_k=2, vocab_size=32000),
)
# latency only (no windows): spread over the dims the ops read (d_model 768 to 7168, d_ff 1536 to 8192, 16 to
# 256 experts, top 1 to 8, 512 to 4096 positions), so a held-out shape has measured neighbours. On the H100's
# five held-out reports (fc91c6b's table), adding the other reports' shapes as latency-only points took the modelled
# shapes' latency error from 8.2% to 3.6% median, energy from 5.8% to 5.1% (``bench.kcm_replay``)
LATENCY_SHAPES = (
    ModelDims(d_model=768, d_ff=3072, n_heads=12, seq_len=512, num_experts=16, top_k=1, vocab_size=50304),
    ModelDims(d_model=1536, d_ff=4608, n_heads=12, seq_len=4096, num_experts=32, top_k=4, vocab_size=32000),
    ModelDims(d_model=2560, d_ff=1536, n_heads=20, seq_len=2048, num_experts=128, top_k=8, vocab_size=151936),
    ModelDims(d_model=3072, d_ff=8192, n_heads=24, seq_len=1024, num_experts=16, top_k=2, vocab_size=32000),
    ModelDims(d_model=5120, d_ff=1536, n_heads=40, seq_len=1024, num_experts=64, top_k=6, vocab_size=32000),
    ModelDims(d_model=7168, d_ff=2048, n_heads=56, seq_len=2048, num_experts=256, top_k=8, vocab_size=32000),
)
PRESSURE_BATCH = {"tokens": 64, "sequences": 4}  # where each op's memory-pressure curve is measured
MIN_THERMAL_SAMPLES = 30  # 3 s of the 10 Hz timeline: fewer cannot fit the thermal model


def gpu_matches(requested: str, detected_name: str) -> bool:
    """Does ``--gpu`` (e.g. "A100") name the detected GPU (e.g. "NVIDIA A100-SXM4-80GB")?"""
    if not isinstance(requested, str) or not requested.strip():
        raise ValueError(f"requested must be a GPU name such as 'A100', got {requested!r}")
    if not isinstance(detected_name, str):
        raise TypeError(f"detected_name must be the GPU's NVML name (str), got {type(detected_name).__name__}")
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(requested)}(?![0-9])", detected_name, re.IGNORECASE) is not None


def measure_ceilings() -> "tuple[float, float]":
    """Measured bf16 matmul FLOP/s and device copy bytes/s (read + write; 1 GiB copied), for the
    roofline split: CUDA-event medians after a warm-up."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    source = torch.randn(2 ** 28, device="cuda")
    target = torch.empty_like(source)
    matmul_ms, copy_ms = (median_event_ms(fn, 20) for fn in _warmed(lambda: a @ a, lambda: target.copy_(source)))
    return 2 * 8192 ** 3 / (matmul_ms * 1e-3), 2 * source.numel() * source.element_size() / (copy_ms * 1e-3)


def _warmed(*fns, calls=5):
    for fn in fns:
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return fns


POWER_CAP_REASONS = 0x4 | 0x80  # nvmlClocksEventReasonSwPowerCap | HwPowerBrakeSlowdown


def thermal_section(samples: "list[GpuReading]", thresholds: dict) -> dict:
    """Fit the thermal model to the sweep's timeline; clock-vs-temperature points; what is extrapolated.

    The fit uses instant power (the die temperature follows it within a sample). Clock-vs-temperature
    leaves out samples whose clock the power cap held, so it shows what heat alone did."""
    usable = [s for s in samples if s.temperature_c is not None and (s.power_instant_w or s.power_average_w)]
    times = [s.time_s for s in usable]
    powers = [s.power_instant_w or s.power_average_w for s in usable]
    temps = [s.temperature_c for s in usable]
    model = fit_thermal_model(times, powers, temps, min_tau_s=0.1)
    by_temp = {}
    for s in usable:
        if s.sm_clock_mhz is not None and not (s.clock_event_reasons or 0) & POWER_CAP_REASONS:
            by_temp.setdefault(int(s.temperature_c), []).append(s.sm_clock_mhz)
    capped = sum(1 for s in usable if (s.clock_event_reasons or 0) & POWER_CAP_REASONS)
    return asdict(model) | {
        "fit_power": "instant board power (NVML field value)",
        "clock_vs_temp": [{"temp_c": t, "sm_clock_mhz": statistics.median(c)} for t, c in sorted(by_temp.items())],
        "power_capped_samples_left_out": capped,
        "max_observed_c": max(temps), "slowdown_temp_c": thresholds["slowdown"],
        "shutdown_temp_c": thresholds["shutdown"],
        "extrapolated_above_c": max(temps),
        "note": "clock behaviour above max_observed_c (up to the NVML slowdown threshold) is an extrapolation",
    }


def sweep_point(op: str, batch_size: int, dims: "ModelDims", meter: "GpuMeter", idle_power_w: float, window_s: float,
                trials: int,
                pressure: "tuple[list[BandwidthHog], dict] | None" = None) -> "tuple[dict, list[dict] | None]":
    """One table point, metered in ``trials`` energy windows (0: a latency-only point, ``energy_j``
    null); with ``pressure`` (hogs, background utilisation) also the op's pressure curve."""
    runner = GraphRunner(op_callable(op, batch_size, dims))
    energy = (measure_energy(meter, runner.run_for, idle_power_w, window_s=window_s, trials=trials) if trials
              else {"energy_j": None})
    flops, nbytes = work(op, batch_size, dims)
    point = {"batch_size": batch_size, "latency_ms": runner.latency_ms, "flops": flops, "bytes": nbytes,
             "memory_gb": nbytes / 1e9} | energy
    return point, measure_pressure_curve(meter, runner, *pressure) if pressure else None


def sweep_plan(settings: "SweepSettings") -> "list[tuple[str, ModelDims, int, int]]":
    """[(op, dims, batch_size, energy trials)]: the table's dims at every batch size (``trials``
    windows at the energy batch sizes, 0 at the others), then each of ``settings.shapes`` at its
    batch sizes (one window each: energy at two batch sizes left four energy terms underdetermined,
    20-43% high at 48 tokens on an H100; latency only at ``SHAPE_LATENCY_TOKEN_BATCHES``), then each
    of ``settings.latency_shapes`` at the same batch sizes, latency only."""
    plan = []
    for op in settings.ops:
        batches, metered = ((SEQUENCE_BATCHES, ENERGY_SEQUENCE_BATCHES) if op in SEQUENCE_OPS
                            else (TOKEN_BATCHES, ENERGY_TOKEN_BATCHES))
        plan += [(op, settings.dims, b, settings.trials if b in metered else 0) for b in batches]
    for dims, windows in [(d, 1) for d in settings.shapes] + [(d, 0) for d in settings.latency_shapes]:
        for op in settings.ops:
            if op in SEQUENCE_OPS:
                plan += [(op, dims, b, windows) for b in SHAPE_SEQUENCE_BATCHES]
            else:
                plan += [(op, dims, b, windows if b in SHAPE_TOKEN_BATCHES else 0)
                         for b in sorted(SHAPE_TOKEN_BATCHES + SHAPE_LATENCY_TOKEN_BATCHES)]
    return plan


def _point_key(op, dims, batch_size, table_dims):
    return op, None if dims == table_dims else tuple(sorted(asdict(dims).items())), batch_size


def progress(n: int, total: int, label: str, elapsed_s: float, stream: TextIO = sys.stderr,
             skipped: int = 0) -> None:
    """A one-line progress bar (redrawn in place on a terminal, one line per step in a log); the
    time left is paced by the ``n - skipped`` points this run measured."""
    total = count("total", total)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= total:
        raise ValueError(f"n must be an int in [0, total = {total}], got {n!r}")
    filled = round(24 * n / total)
    left_s = elapsed_s / max(n - skipped, 1) * (total - n)
    line = f"[{'#' * filled}{'.' * (24 - filled)}] {n}/{total} {label} {elapsed_s:4.0f} s, ~{left_s:3.0f} s left"
    end = "\r" if stream.isatty() and n < total else "\n"
    print(line, end=end, file=stream, flush=True)


def pressure_section(shares: "Sequence[float]", background: dict, curves: dict) -> dict:
    return {"coordinate": "NVML memory-bandwidth utilisation (0..1) the background produces alone",
            "method": "BandwidthHog: a copy loop on its own stream, duty-cycled with GPU sleeps to a share of time; "
                      "latency stretch = CUDA-event median of the op's graph replays beside it / alone",
            "shares": list(shares), "background_util": {str(k): v for k, v in background.items()},
            "ops": {op: {"batch_size": b, "points": pts} for op, (b, pts) in curves.items()}}


def kept_collectives(path: Path) -> "dict | None":
    """The collective curves of the table at ``path`` (measured apart, by ``bench.calibrate_comm``),
    which a new sweep keeps; None without a readable table there."""
    try:
        return load_table(table=path)[0].get("collectives")
    except ValueError:  # no table yet, or a corrupt one: nothing to keep
        return None


def partial_path(output: "str | Path") -> Path:
    return output_path("output", output).with_suffix(".partial.json")


def sweep_settings(args: "SweepSettings") -> dict:
    """What must match for ``--resume`` to add points to an earlier sweep (JSON-plain)."""
    return {"gpu": args.gpu, "dims": asdict(args.dims), "ops": list(args.ops), "window_s": args.window_s,
            "trials": args.trials, "pressure_shares": list(args.pressure_shares),
            "shapes": [asdict(dims) for dims in args.shapes],
            "latency_shapes": [asdict(dims) for dims in args.latency_shapes]}


def new_state(args: "SweepSettings") -> dict:
    """A sweep with nothing measured yet (what ``<gpu>.partial.json`` holds as it goes)."""
    return {"schema": 1, "settings": sweep_settings(args), "constants": None, "background_util": None,
            "points": {op: [] for op in args.ops}, "pressure_curves": {}, "measured_s": 0.0, "runs": 0, "boards": []}


def rejected_path(output: "str | Path") -> Path:
    return output_path("output", output).with_suffix(".rejected.json")


def write_table(output: Path, table: dict) -> "str | None":
    """Write ``table`` to ``output`` if it passes ``check_table`` (None); else to ``rejected_path(output)``,
    leaving the table at ``output`` as it was, and return why."""
    try:
        check_table(output, table)
    except ValueError as exc:
        write_json_atomic(rejected_path(output), table)
        return str(exc)
    write_json_atomic(output, table)
    return None


def sweep(args: "SweepSettings", meter: "GpuMeter", state: dict, save: "Callable[[dict], None]",
          keep_timeline: "Callable[[BackgroundSampler], None]" = lambda sampler: None) -> BackgroundSampler:
    """Measure the points ``state`` lacks (every (op, batch), and each op's pressure curve at its
    PRESSURE_BATCH), calling ``save(state)`` and ``keep_timeline(sampler)`` after each; the sampler of
    this run's timeline."""
    hogs = [BandwidthHog(share) for share in args.pressure_shares]
    if hogs and state["background_util"] is None:
        state["background_util"] = [[share, util] for share, util in background_utilisation(meter, hogs).items()]
        save(state)
    background = background_of(state)
    idle_power_w = state["constants"]["idle_power_w"]
    plan = sweep_plan(args)
    done = {_point_key(op, ModelDims(**p.get("dims", asdict(args.dims))), p["batch_size"], args.dims)
            for op, points in state["points"].items() for p in points}
    started, skipped = time.monotonic(), 0
    with BackgroundSampler(meter, interval_s=0.1) as sampler:
        for n, (op, dims, batch_size, trials) in enumerate(plan, 1):
            if _point_key(op, dims, batch_size, args.dims) in done:
                skipped += 1
                continue
            point_started = time.monotonic()
            at_pressure_batch = dims == args.dims and batch_size == PRESSURE_BATCH[
                "sequences" if op in SEQUENCE_OPS else "tokens"]
            try:
                point, curve = sweep_point(op, batch_size, dims, meter, idle_power_w, args.window_s, trials,
                                           (hogs, background) if hogs and at_pressure_batch else None)
            except torch.OutOfMemoryError:  # a shape beyond this card's memory (256 experts of 7168 x 2048 on
                torch.cuda.empty_cache()    # a 24 GB card): recorded, left to the model, the sweep goes on
                missed = {"op": op, "dims": asdict(dims), "batch_size": batch_size}
                if missed not in state.setdefault("out_of_memory", []):  # a resumed run tries it again
                    state["out_of_memory"].append(missed)
                save(state)
                progress(n, len(plan), f"{op} batch {batch_size}: out of memory, skipped", time.monotonic() - started,
                         skipped=skipped)
                continue
            if dims != args.dims:
                point = {"dims": asdict(dims)} | point
            state["points"][op].append(point)
            state["out_of_memory"] = [m for m in state.get("out_of_memory", [])
                                      if (m["op"], m["dims"], m["batch_size"]) != (op, asdict(dims), batch_size)]
            if curve:
                state["pressure_curves"][op] = [batch_size, curve]
            state["measured_s"] += time.monotonic() - point_started
            save(state)
            keep_timeline(sampler)
            label = (f"{op} batch {batch_size}" + ("" if dims == args.dims else f" at d_model {dims.d_model}")
                     + ("" if trials else " (latency)"))
            progress(n, len(plan), label, time.monotonic() - started, skipped=skipped)
    return sampler


def background_of(state: dict) -> "dict[float, float | None]":
    """{HBM share: the NVML utilisation its hog produced alone}, from the JSON-plain pairs ``state`` keeps."""
    return {share: util for share, util in state["background_util"] or []}


def measure_constants(meter: "GpuMeter") -> "dict[str, float]":
    """Idle and gap power (W) and the matmul and copy ceilings (FLOP/s, bytes/s). Idle power is measured twice: settled
    (``idle_power_cold_w``), and right after the ceilings' load, the state the card stays in for
    minutes after work (an H200: 80 W cold, 123-127 W after load). The sweep's windows subtract
    their idle tails at the after-load figure, ``idle_power_w``, since that is the state their
    tails are in: charged at the cold figure, every window over-counted its tail."""
    time.sleep(3.0)  # let the card settle from whatever ran before
    idle_power_cold_w = measure_idle_power_w(meter)  # with this process's CUDA context held, as users run
    peak_flops, copy_bytes_per_s = measure_ceilings()
    idle_power_w = measure_idle_power_w(meter)
    return {"idle_power_w": idle_power_w, "idle_power_cold_w": idle_power_cold_w,
            "gap_power_w": measure_gap_power_w(meter, idle_power_w),
            "peak_flops": peak_flops, "hbm_bytes_per_s": copy_bytes_per_s}


def device_facts() -> dict:
    """What the cost model's tile fit needs of this card and build: SM count, L2 bytes, and the
    block configs our kernels read here (``kernels.config_entries``); without CUDA, why not."""
    if not torch.cuda.is_available():
        return {"device_facts_missing_reason": "no CUDA device when the table was built"}
    from kernels import config_entries
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"sm_count": props.multi_processor_count, "l2_cache_bytes": props.L2_cache_size,
            "kernel_configs": config_entries("cuda")}


def build_table(args: "SweepSettings", state: dict, meter: "GpuMeter", detected: str, timeline: "list[GpuReading]",
                duration_s: float) -> dict:
    """The table of ``state``'s points, its thermal model fitted to ``timeline`` (``RunTimelines.longest``)."""
    points = {op: sorted(pts, key=lambda p: (bool(p.get("dims")), p["batch_size"]))
              for op, pts in state["points"].items()}
    curves = {op: tuple(entry) for op, entry in state["pressure_curves"].items()}
    background = background_of(state)
    table = {
        "schema": 1, "gpu": args.gpu, "source": "measured", "gpu_name": detected,
        "provenance": provenance() | {"driver": meter.driver_version(), "gpu_uuid": meter.uuid()},
        "dims": asdict(args.dims), **state["constants"], **device_facts(),
        "method": {"window_s": args.window_s, "trials": args.trials, "dtype": "bfloat16",
                   "energy": "NVML total-energy counter, edge-aligned windows of CUDA-graph replays",
                   "latency": "median CUDA-event time of CUDA-graph replays",
                   "latency_only": "points with energy_j null were timed without an energy window "
                                   "(calibration.sweep.sweep_plan)"},
        "thermal": None,
        "memory_pressure": pressure_section(args.pressure_shares, background, curves) if args.pressure_shares else None,
        "ops": {op: {"unit": "sequences" if op in SEQUENCE_OPS else "tokens", "points": pts}
                for op, pts in points.items()},
        "duration_s": duration_s,
    }
    usable = [x for x in timeline if x.temperature_c is not None]
    if len(usable) >= MIN_THERMAL_SAMPLES:
        table["thermal"] = thermal_section(timeline, meter.temperature_thresholds_c())
    else:  # a resumed run that measured only a few points, and no earlier run's timeline was kept
        table["thermal_missing_reason"] = (f"the longest run's timeline has {len(usable)} temperature samples, under "
                                           f"the {MIN_THERMAL_SAMPLES} a fit needs: calibrate without --resume")
    if state["runs"] > 1:
        table["resumed"] = {"runs": state["runs"], "points_measured_s": state["measured_s"],
                            "boards": state.get("boards") or "not recorded (a partial sweep from before boards were)",
                            "note": "an interrupted sweep continued with --resume: idle power and ceilings are the "
                                    "first run's, the thermal model and trace are the run's with the longest "
                                    "timeline (calibration.timelines)"}
    if state.get("out_of_memory"):
        table["out_of_memory_points"] = {"points": state["out_of_memory"],
                                         "note": "these did not fit in this GPU's memory; the shape-general model "
                                                 "costs them (another run with --resume tries them again)"}
    collectives = kept_collectives(args.output)
    if collectives:
        table["collectives"] = collectives
    if not gpu_has_fp8():
        table["fp8_ops_missing_reason"] = f"the {detected} has no FP8 (compute capability below 8.9)"
    return keep_other_ops(table, args)


def keep_other_ops(table: dict, args: "SweepSettings") -> dict:
    """``table`` with the ops of the table at ``args.output`` that this sweep did not measure, where
    that table is a measurement of the same GPU at the same dims (``merge_ops``, as ``kept_ops``)."""
    try:
        old = load_table(table=args.output)[0]
    except ValueError:  # no table yet, or a corrupt one
        return table
    if old.get("source") != "measured" or old.get("gpu_name") != table["gpu_name"] or old["dims"] != table["dims"]:
        return table
    kept = [op for op in old["ops"] if op not in table["ops"]]
    return merge_ops(table, old, kept, "kept_ops") if kept else table


def merge_ops(table: dict, source: dict, ops: "Sequence[str]", record: str) -> dict:
    """``table`` with ``ops`` taken from the measured table ``source`` (their pressure curves too, where
    the background shares match), and ``table[record]`` naming them with ``source``'s provenance and
    idle power: each op's points stay as its own sweep measured them."""
    table["ops"] |= {op: source["ops"][op] for op in ops}
    source_pressure, pressure = source.get("memory_pressure"), table.get("memory_pressure")
    if source_pressure and pressure and source_pressure.get("shares") == pressure["shares"]:
        pressure["ops"] |= {op: curve for op, curve in source_pressure["ops"].items() if op in ops}
    table[record] = {"ops": list(ops), "provenance": source.get("provenance"), "idle_power_w": source["idle_power_w"],
                     "note": "measured by another sweep of this GPU model at the same dims (its provenance here); "
                             "the table's constants, thermal fit and trace are its own sweep's"}
    return table


@dataclass(frozen=True)
class SweepSettings:
    """What one sweep measures and where its table goes (``--resume`` needs the same, ``sweep_settings``)."""
    gpu: str  # the table's short name, e.g. H100
    dims: ModelDims
    ops: tuple
    output: Path
    window_s: float = 1.0
    trials: int = 2
    pressure_shares: tuple = (0.5, 0.9)
    trace: Path | None = None
    shapes: tuple = SHAPE_SWEEP  # extra dims measured for the tile fit (module docstring); () for none
    latency_shapes: tuple = LATENCY_SHAPES  # extra dims timed without energy windows; () for none

    def __post_init__(self):
        """Every field checked before anything is measured (TypeError or ValueError naming it); lists become
        tuples, paths ``Path``s and numbers Python's."""
        if not isinstance(self.gpu, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", self.gpu):
            raise ValueError(f"gpu must be a short GPU name such as 'H100', got {self.gpu!r}")
        checked = {name: _as_tuple(name, getattr(self, name)) for name in ("ops", "pressure_shares", "shapes",
                                                                           "latency_shapes")}
        if not checked["ops"] or len(set(checked["ops"])) < len(checked["ops"]) or not set(checked["ops"]) <= set(OPS):
            raise ValueError(f"ops must be distinct ops of costmodel.ops.OPS, at least one, got {self.ops!r}")
        for name, dims in [("dims", self.dims), *(("shapes", d) for d in checked["shapes"]),
                           *(("latency_shapes", d) for d in checked["latency_shapes"])]:
            if not isinstance(dims, ModelDims):
                raise TypeError(f"{name} must hold costmodel.ops.ModelDims, got {type(dims).__name__}")
        checked["pressure_shares"] = tuple(finite_number("pressure_shares", share, low=0.0, low_open=True, high=1.0)
                                           for share in checked["pressure_shares"])
        checked |= {"output": output_path("output", self.output), "window_s": check_window_s(self.window_s),
                    "trials": count("trials", self.trials),
                    "trace": None if self.trace is None else output_path("trace", self.trace)}
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked values in place of the given


def _as_tuple(name, value):
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple, got {type(value).__name__}")
    return tuple(value)


def detected_gpu(meter: "GpuMeter", requested: str) -> str:
    """The GPU's NVML name; ValueError unless a CUDA GPU whose energy NVML reads is ``requested``."""
    if not torch.cuda.is_available():
        raise ValueError("no NVIDIA GPU detected (torch.cuda.is_available() is False): calibration measures a GPU")
    if not meter.available:
        raise ValueError(f"cannot read the GPU's energy: {meter.unavailable_reason}")
    detected = meter.name()
    if not gpu_matches(requested, detected):
        raise ValueError(f"--gpu {requested} does not match the detected GPU {detected!r}")
    return detected


def run_sweep(settings: "SweepSettings", state: dict, meter: "GpuMeter", detected: str) -> "tuple[dict, str | None]":
    """Measure what ``state`` lacks and write the table: (table, None), or (table, why it was
    rejected) with the table at ``settings.output`` left as it was and the partial sweep kept."""
    started, partial = time.monotonic(), partial_path(settings.output)
    state["runs"] += 1
    state.setdefault("boards", []).append(meter.uuid())  # each run's board (NVML UUID; None if unreadable)
    save = functools.partial(write_json_atomic, partial)
    if state["constants"] is None:
        state["constants"] = measure_constants(meter)
        save(state)
    timelines = RunTimelines(timeline_path(settings.output), state["runs"])
    sampler = sweep(settings, meter, state, save, functools.partial(timelines.keep, meter))
    timeline, trace = timelines.longest(meter, sampler)
    table = build_table(settings, state, meter, detected, timeline, time.monotonic() - started)
    rejected = write_table(settings.output, table)
    if settings.trace and trace:
        write_json_atomic(settings.trace, trace | {"provenance": table["provenance"]})
    if not rejected:
        partial.unlink(missing_ok=True)
        timelines.discard()
    return table, rejected


def calibrate_ops(gpu: str, ops: "Sequence[str]", dims: "ModelDims", output: "str | Path") -> dict:
    """A fresh table of ``ops`` at ``dims`` on this GPU at ``output`` (the default settings): the table."""
    settings = SweepSettings(gpu, dims, ops, output, shapes=(), latency_shapes=())
    meter = GpuMeter(torch.cuda.current_device() if torch.cuda.is_available() else 0)  # no GPU: detected_gpu says so
    table, rejected = run_sweep(settings, new_state(settings), meter, detected_gpu(meter, gpu))
    if rejected:
        raise RuntimeError(f"the measured table fails its check ({rejected}); "
                           f"it is at {rejected_path(settings.output)}")
    return table
