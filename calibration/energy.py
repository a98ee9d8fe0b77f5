"""Energy and latency of a kernel from the NVML energy counter, measured the way the counter allows.

The H100's counter moves only about every 100 ms, so one call is invisible to it. A window
therefore repeats the kernel back to back (CUDA-graph replays, so launch gaps do not dilute it)
for at least ``window_s`` (1 s = 10 or more counter updates). Each window starts on a counter
update and ends on the next update after the work: the idle tail between the work's end and that
update is charged at the measured idle power and subtracted. Since every window opens on an update,
no delay before it would change its phase against the counter; trials follow each other at once,
and their median and spread are reported.
Latency is the median CUDA-event time of a graph replay over its calls (the same launches the
windows run). GPU state is recorded at each window's start and end.
"""
import contextlib
import numbers
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from calibration.validate import check_meter
from costmodel.validate import MAX_BOARD_POWER_W, count, finite_number

if TYPE_CHECKING:  # annotations only: no import at run time
    from calibration.nvml_meter import GpuMeter, GpuReading

MIN_WINDOW_S = 1.0  # 10+ updates of the ~100 ms energy counter


@dataclass(frozen=True)
class WindowResult:
    calls: int
    duration_s: float
    energy_j: float  # the work's energy (idle tail removed)
    start: object  # GpuReading
    end: object


def check_window_s(window_s: object) -> float:
    """``window_s`` as a float: a finite number of seconds >= ``MIN_WINDOW_S``."""
    return finite_number("window_s", window_s, low=MIN_WINDOW_S, why=" s (10+ updates of the ~100 ms energy counter)")


def check_idle_power_w(idle_power_w: object) -> float:
    """``idle_power_w`` as a float: a finite board power in [0, ``MAX_BOARD_POWER_W``] W."""
    return finite_number("idle_power_w", idle_power_w, low=0.0, high=MAX_BOARD_POWER_W, why=" W")


def _check_run_for(run_for):
    if not callable(run_for):
        raise TypeError(f"run_for must be a callable run_for(seconds) -> calls, got {type(run_for).__name__}")


def wait_for_counter_update(meter: "GpuMeter", timeout_s: float = 1.0) -> "GpuReading":
    """Poll until the energy counter changes; the reading just after the change. RuntimeError when
    there is no counter, it stops reading, or it does not change within ``timeout_s`` (s, > 0)."""
    check_meter("meter", meter)
    timeout_s = finite_number("timeout_s", timeout_s, low=0.0, low_open=True, why=" s")
    first = meter.read()
    if first.energy_mj is None:
        raise RuntimeError(f"no energy counter: {first.missing.get('energy_mj')}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reading = meter.read()
        if reading.energy_mj is None:
            raise RuntimeError(f"the energy counter stopped reading: {reading.missing.get('energy_mj')}")
        if reading.energy_mj != first.energy_mj:
            return reading
        time.sleep(0.002)
    raise RuntimeError(f"the energy counter did not change within {timeout_s} s")


def _counter_energy_j(start, end):
    """Joules the counter gained from reading ``start`` to ``end``; RuntimeError unless it advanced
    (a counter that ran backwards or stood still measured nothing: a driver reload, another board)."""
    if end.energy_mj <= start.energy_mj or end.time_s <= start.time_s:
        raise RuntimeError(f"the energy counter went from {start.energy_mj} mJ to {end.energy_mj} mJ over "
                           f"{end.time_s - start.time_s:.6g} s: it must advance (driver reload or counter reset?); "
                           "no measurement")
    return (end.energy_mj - start.energy_mj) / 1000.0


def measure_idle_power_w(meter: "GpuMeter", seconds: float = 2.0) -> float:
    """Idle (static) board power (W): counter energy over ``seconds`` (>= 0) of doing nothing, edge to edge.
    RuntimeError when the counter does not advance or gives a power no board draws."""
    check_meter("meter", meter)
    seconds = finite_number("seconds", seconds, low=0.0, why=" s")
    start = wait_for_counter_update(meter)
    time.sleep(seconds)
    end = wait_for_counter_update(meter)
    power_w = _counter_energy_j(start, end) / (end.time_s - start.time_s)
    if power_w > MAX_BOARD_POWER_W:
        raise RuntimeError(f"idle power came out {power_w:.6g} W, above any board's ({MAX_BOARD_POWER_W:g} W): "
                           "the energy counter jumped; no measurement")
    return power_w


def measure_window(meter: "GpuMeter", run_for: "Callable[[float], int]", window_s: float,
                   idle_power_w: float) -> WindowResult:
    """One window: ``run_for(seconds) -> calls`` does the work (at least one call, for at least
    ``seconds``, and waits for the device). RuntimeError when the counter does not advance or the
    work's energy, once the idle tail is removed, is not positive (``idle_power_w`` too high)."""
    check_meter("meter", meter)
    _check_run_for(run_for)
    window_s, idle_power_w = check_window_s(window_s), check_idle_power_w(idle_power_w)
    start = wait_for_counter_update(meter)
    t0 = time.monotonic()
    calls = run_for(window_s)
    t_end = time.monotonic()
    if isinstance(calls, bool) or not isinstance(calls, numbers.Integral):
        raise TypeError(f"run_for must return the number of calls it ran (an int), got {type(calls).__name__}")
    if calls < 1:
        raise ValueError(f"run_for returned {calls} calls: a window must run the work at least once")
    if t_end - t0 < window_s:
        raise ValueError(f"run_for({window_s:g}) returned after {t_end - t0:.3g} s: it must run the work for at "
                         "least the seconds it is given")
    end = wait_for_counter_update(meter)
    energy_j = _counter_energy_j(start, end) - idle_power_w * (end.time_s - t_end)
    if energy_j <= 0:
        raise RuntimeError(f"the window's energy is {energy_j:.6g} J once the idle tail is charged at idle_power_w "
                           f"{idle_power_w:g} W: idle power above the board's power under load; measure it again")
    return WindowResult(int(calls), t_end - t0, energy_j, start, end)


def measure_energy(meter: "GpuMeter", run_for: "Callable[[float], int]", idle_power_w: float,
                   window_s: float = MIN_WINDOW_S, trials: int = 3) -> dict:
    """Median and spread of energy per call (J) over ``trials`` (>= 1) windows of at least ``window_s``
    (>= 1 s); ``measure_window``'s errors for a window that measured nothing."""
    check_meter("meter", meter)
    _check_run_for(run_for)
    idle_power_w, window_s, trials = check_idle_power_w(idle_power_w), check_window_s(window_s), count("trials", trials)
    windows = [measure_window(meter, run_for, window_s, idle_power_w) for _ in range(trials)]
    per_call = [w.energy_j / w.calls for w in windows]
    power = [w.energy_j / w.duration_s for w in windows]
    return {
        "energy_j": statistics.median(per_call), "energy_j_min": min(per_call), "energy_j_max": max(per_call),
        "power_w": statistics.median(power), "calls_per_window": [w.calls for w in windows],
        "window_s": [w.duration_s for w in windows],
        "state_start": _state(windows[0].start), "state_end": _state(windows[-1].end),
    }


def measure_gap_power_w(meter: "GpuMeter", idle_power_w: float, launch_every_s: float = 2e-4) -> float:
    """Board power (W) while the host launches a tiny kernel every ``launch_every_s`` (s): the GPU awake but
    mostly waiting, as in the gaps between an eager forward's kernels (deep idle draws less)."""
    launch_every_s = finite_number("launch_every_s", launch_every_s, low=0.0, low_open=True, why=" s")
    check_idle_power_w(idle_power_w)
    import torch
    scratch = torch.zeros(1, device="cuda")

    def launch_then_wait() -> None:
        scratch.add_(1.0)
        time.sleep(launch_every_s)
    return measure_energy(meter, lambda seconds: repeat_for(launch_then_wait, seconds), idle_power_w,
                          window_s=MIN_WINDOW_S, trials=2)["power_w"]


def _state(reading):
    return {"temperature_c": reading.temperature_c, "sm_clock_mhz": reading.sm_clock_mhz,
            "mem_clock_mhz": reading.mem_clock_mhz, "clock_event_reasons": reading.clock_event_reasons,
            "power_average_w": reading.power_average_w}


class GraphRunner:
    """``fn`` captured ``calls_per_replay`` times in one CUDA graph, with its median latency per call.

    ``fn`` must be capturable (no host syncs); it is warmed up first, and runs without autograd
    (calibration measures the inference kernels). ``run_for(seconds) -> calls`` replays the graph
    back to back for that long and waits for the device."""

    def __init__(self, fn, target_replay_ms=10.0):
        _check_fn(fn)
        target_replay_ms = finite_number("target_replay_ms", target_replay_ms, low=0.0, low_open=True, why=" ms")
        import torch
        self.torch = torch
        self.fn = fn  # the graph reads the tensors fn holds: they must outlive it
        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            rough_ms = median_event_ms(fn, 10)  # eager: includes launch gaps, only sizes the graph
            self.calls_per_replay = max(1, min(1000, int(target_replay_ms / max(rough_ms, 1e-3))))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(self.calls_per_replay):
                    fn()
        self.graph.replay()
        torch.cuda.synchronize()
        self.latency_ms = median_event_ms(self.graph.replay, 10) / self.calls_per_replay  # as the windows run it

    def run_for(self, seconds: float) -> int:
        return repeat_for(self.graph.replay, seconds) * self.calls_per_replay


class EagerRunner:
    """``run_for(seconds) -> calls`` of a plain Python call (launch gaps and all, as users run it),
    without autograd, and its median CUDA-event latency; warmed up first."""

    def __init__(self, fn):
        _check_fn(fn)
        import torch
        self.torch, self.fn = torch, fn
        with torch.no_grad():
            for _ in range(3):
                fn()
            self.latency_ms = median_event_ms(fn, 20)

    def run_for(self, seconds: float) -> int:
        with self.torch.no_grad():
            return repeat_for(self.fn, seconds)


class DeferredTimer:
    """Times blocks of work without a host sync: CUDA events read later on a GPU, ``perf_counter``
    on a CPU. ``settle()`` waits for the last block and returns every (seconds, tag) since the last."""

    def __init__(self):
        self._records = []

    @contextlib.contextmanager
    def time(self, on_gpu: bool, tag: object = None) -> "Iterator[None]":
        if on_gpu:
            import torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._records.append((start, end, tag))

    def settle(self) -> "list[tuple[float, object]]":
        if self._records and not isinstance(self._records[-1][1], float):
            self._records[-1][1].synchronize()  # elapsed_time needs completed events
        done = [((end - start) if isinstance(start, float) else start.elapsed_time(end) * 1e-3, tag)
                for start, end, tag in self._records]
        self._records = []
        return done


def _check_fn(fn):
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")


def repeat_for(fn: "Callable[[], object]", seconds: float) -> int:
    """Call ``fn`` back to back for ``seconds`` (finite, >= 0) and wait for the device; the number of calls.
    The host stays at most 8 calls ahead of the device, so the time is the device's."""
    _check_fn(fn)
    seconds = finite_number("seconds", seconds, low=0.0, why=" s")
    import torch
    calls, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return calls


def event_times_ms(fn: "Callable[[], object]", repeats: int) -> "list[float]":
    """CUDA-event times of ``repeats`` (>= 1) calls of ``fn()``, each waited for (ms)."""
    _check_fn(fn)
    repeats = count("repeats", repeats)
    import torch
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median_event_ms(fn: "Callable[[], object]", repeats: int) -> float:
    """Median CUDA-event time of ``fn()`` over ``repeats`` calls, each waited for (ms)."""
    return statistics.median(event_times_ms(fn, repeats))
