"""``python -m bench.meter_check``: our energy meter against Zeus's ``ZeusMonitor`` on the same windows.

Four workloads span the board's power range: a bf16 GEMM (8192^3, near the power limit), our
``swiglu_ffn`` at OLMoE's expert dims and 256 tokens, a 1 GiB device copy (memory-bound) and a
small elementwise add (near idle). Each runs as CUDA-graph replays, warmed up first, then the
idle power is measured (after load, as the calibration sweep sees it) and every workload gets
``--trials`` windows of ``--window_s`` measured by all four methods of
``calibration.meter_check`` (ours, Zeus as a user writes it, Zeus on our edges, the integrated
instantaneous power). Needs a CUDA device and Zeus (``pip install -e ".[zeus]"``); without either
the report says why and holds no figure. Writes ``--output`` atomically and prints a table last.
"""
import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench._cli import checked_output_file, comma_list, positive_int, window_s
from calibration.energy import GraphRunner, measure_idle_power_w
from calibration.meter_check import check_workload, verdict
from calibration.nvml_meter import GpuMeter
from calibration.results import provenance, write_json_atomic

WORKLOADS = ("gemm", "swiglu_ffn", "copy", "add")


def workload_call(name: str, device: torch.device | str, seed: int = 0) -> Callable[[], torch.Tensor]:
    """A no-argument, graph-capturable call of one workload on random bf16 data."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)
    if name == "gemm":
        a, b = randn(8192, 8192), randn(8192, 8192, scale=8192 ** -0.5)
        return lambda: a @ b
    if name == "swiglu_ffn":
        import kernels
        x, gate_up = randn(256, 2048), randn(2 * 1024, 2048, scale=2048 ** -0.5)
        down = randn(2048, 1024, scale=1024 ** -0.5)
        return lambda: kernels.swiglu_ffn(x, gate_up, down)
    if name == "copy":
        source = randn(2 ** 29)  # 1 GiB of bf16
        target = torch.empty_like(source)
        return lambda: target.copy_(source)
    x, y = randn(2 ** 16), randn(2 ** 16)
    return lambda: torch.add(x, y)


def unavailable_reason() -> str | None:
    """Why no check can run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device: the meters read an NVIDIA GPU's energy counter"
    try:
        import zeus.monitor  # noqa: F401
    except ImportError:
        return 'Zeus is not installed: pip install -e ".[zeus]"'
    if not GpuMeter(torch.cuda.current_device()).available:
        return "NVML reads nothing on this device"
    return None


def run(args: argparse.Namespace) -> tuple:
    from zeus.monitor import ZeusMonitor
    index = torch.cuda.current_device()
    meter = GpuMeter(index)
    runners = {name: GraphRunner(workload_call(name, "cuda")) for name in args.workloads}
    for runner in runners.values():
        runner.run_for(1.0)  # warm: the idle power below is the card's state after load
    idle_power_w = measure_idle_power_w(meter, 2.0)
    zeus = ZeusMonitor(gpu_indices=[index])
    workloads = {}
    for name, runner in runners.items():
        workloads[name] = check_workload(meter, zeus, index, runner.run_for, idle_power_w, args.window_s, args.trials)
        workloads[name]["latency_ms"] = runner.latency_ms
        print(f"[meter_check] {name}: zeus/ours {workloads[name]['vs_ours']['zeus']:.4f}", file=sys.stderr,
              flush=True)
    return idle_power_w, workloads


def table_lines(workloads: dict) -> list:
    lines = [f"{'workload':<12}{'ours W':>9}{'zeus/ours':>11}{'zeus on our edges/ours':>24}{'power integral/ours':>21}"]
    for name, w in workloads.items():
        ratios = [w["vs_ours"][m] for m in ("zeus", "zeus_aligned", "power_integral")]
        cells = "".join(f"{'-' if r is None else f'{r:.4f}':>{width}}" for r, width in zip(ratios, (11, 24, 21)))
        lines.append(f"{name:<12}{w['power_w']:>9.1f}{cells}")
    return lines


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.meter_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=comma_list(choices=WORKLOADS), default=",".join(WORKLOADS))
    parser.add_argument("--window_s", type=window_s, default=3.0, help="seconds of work per window (>= 1)")
    parser.add_argument("--trials", type=positive_int, default=5, help="windows per workload")
    parser.add_argument("--output", default="meter_check.json")
    args = parser.parse_args(argv)
    args.output = checked_output_file(parser, args.output)
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    report = {"provenance": provenance(), "method": "calibration.meter_check (module docstring)",
              "window_s": args.window_s, "trials": args.trials}
    reason = unavailable_reason()
    if reason is not None:
        write_json_atomic(Path(args.output), report | {"measured": False, "reason": reason, "workloads": None,
                                                       "verdict": None})
        print(f"bench.meter_check measured nothing: {reason}")
        return 0
    idle_power_w, workloads = run(args)
    report |= {"measured": True, "reason": None, "device": torch.cuda.get_device_name(), "idle_power_w": idle_power_w,
               "workloads": workloads, "verdict": verdict(workloads)}
    write_json_atomic(Path(args.output), report)
    print("\n".join(table_lines(workloads)))
    print(f"agree within 1%: {report['verdict']['agree']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
