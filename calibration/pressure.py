"""Memory pressure: how much an op slows down while another stream takes a share of HBM bandwidth.

``BandwidthHog(share)`` is that other workload: on its own CUDA stream it copies a large buffer,
then sleeps on the GPU (``torch.cuda._sleep``) for as long again as makes the copies take about
``share`` of the time. The share is only a setting; what the cost model's ``memory_pressure``
means is what NVML's memory-bandwidth utilisation reads while the hog runs alone (what a monitor
sees of other tenants before our op starts). ``measure_pressure_curve`` records, for each share,
that utilisation, the utilisation the op and the hog produce together, and the op's latency
stretch against the op alone (CUDA-event medians of graph replays, on the same card in the same
run). The hog's copies also occupy SMs, as any real neighbour's kernels would.
"""
import statistics
import time
from typing import TYPE_CHECKING

from calibration.energy import GraphRunner, median_event_ms
from calibration.validate import check_meter
from costmodel.validate import finite_number

if TYPE_CHECKING:  # annotations only: no import at run time
    from calibration.nvml_meter import GpuMeter

HOG_BUFFER_BYTES = 256 * 2 ** 20  # far beyond L2, so every copy goes to HBM


class BandwidthHog:
    """A background copy loop that keeps HBM busy about ``share`` (0, 1] of the time, in periods of
    about ``period_ms`` (> 0)."""

    def __init__(self, share, period_ms=20.0, device="cuda"):
        share = finite_number("share", share, low=0.0, low_open=True, high=1.0)
        period_ms = finite_number("period_ms", period_ms, low=0.0, low_open=True, why=" ms")
        import torch
        self.torch, self.share = torch, share
        self.stream = torch.cuda.Stream(device)
        src = torch.randn(HOG_BUFFER_BYTES // 4, device=device)
        dst = torch.empty_like(src)
        copy_ms = median_event_ms(lambda: dst.copy_(src), 5)
        sleep_cycles = int(copy_ms * (1.0 - share) / share * _sleep_cycles_per_ms(torch))
        pairs = max(1, int(period_ms / (copy_ms / share)))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            for _ in range(pairs):
                dst.copy_(src)
                if sleep_cycles:
                    torch.cuda._sleep(sleep_cycles)
        self.period_ms = pairs * copy_ms / share
        self._buffers = (src, dst)  # the graph reads and writes them

    def start(self, seconds: float) -> None:
        """Queue ``seconds`` (finite, >= 0) of background traffic on the hog's stream (returns at once)."""
        seconds = finite_number("seconds", seconds, low=0.0, why=" s")
        with self.torch.cuda.stream(self.stream):  # a replay runs on the current stream
            for _ in range(max(1, int(seconds * 1e3 / self.period_ms) + 1)):
                self.graph.replay()

    def wait(self) -> None:
        self.stream.synchronize()


def _sleep_cycles_per_ms(torch):
    """GPU clock cycles per ms of ``torch.cuda._sleep``, measured (the clock the card runs now)."""
    cycles = 10_000_000
    return cycles / median_event_ms(lambda: torch.cuda._sleep(cycles), 3)


def _replay_latency_ms(runner, seconds):
    """Median per-call latency of ``runner``'s graph replays, replayed back to back for ``seconds``."""
    torch, times, t0 = runner.torch, [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / runner.calls_per_replay


def _utilisation(meter):
    """NVML memory-bandwidth utilisation in [0, 1], or None when NVML gives none or an impossible one."""
    pct = meter.read().memory_bandwidth_util_pct
    return pct / 100.0 if pct is not None and 0 <= pct <= 100 else None


def _check_window_s(window_s):
    return finite_number("window_s", window_s, low=0.0, low_open=True, why=" s")


def background_utilisation(meter: "GpuMeter", hogs: "list[BandwidthHog]",
                           window_s: float = 0.5) -> "dict[float, float | None]":
    """NVML memory utilisation (0..1, None where NVML gives none) each hog produces running alone over
    ``window_s`` (s, > 0): the pressure coordinate."""
    check_meter("meter", meter)
    window_s = _check_window_s(window_s)
    utilisation = {}
    for hog in hogs:
        hog.start(window_s + 0.2)
        time.sleep(window_s)
        utilisation[hog.share] = _utilisation(meter)
        hog.wait()
    return utilisation


def measure_pressure_curve(meter: "GpuMeter", runner: "GraphRunner", hogs: "list[BandwidthHog]", background: dict,
                           window_s: float = 0.5) -> "list[dict]":
    """Points of (background utilisation, pair utilisation, latency stretch) for one op.

    ``runner`` is the op's ``calibration.energy.GraphRunner``; ``background`` is
    ``background_utilisation(meter, hogs)``. The first point is the op alone (stretch 1); each window
    lasts ``window_s`` (s, > 0)."""
    check_meter("meter", meter)
    window_s = _check_window_s(window_s)
    unknown = [hog.share for hog in hogs if hog.share not in background]
    if unknown:
        raise ValueError(f"background has no utilisation for the hogs of share {unknown}: pass "
                         "background_utilisation(meter, hogs)")
    alone_ms = _replay_latency_ms(runner, window_s)
    points = [{"share": 0.0, "background_util": 0.0, "pair_util": _utilisation(meter),
               "latency_ms": alone_ms, "stretch": 1.0}]
    for hog in hogs:
        hog.start(window_s + 0.3)
        pressed_ms = _replay_latency_ms(runner, window_s)
        pair_util = _utilisation(meter)
        hog.wait()
        points.append({"share": hog.share, "background_util": background[hog.share], "pair_util": pair_util,
                       "latency_ms": pressed_ms, "stretch": pressed_ms / alone_ms})
    return points
