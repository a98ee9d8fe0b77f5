"""Our energy meter against Zeus's ``ZeusMonitor``, on the same windows of the same work.

Both read one NVML counter (``nvmlDeviceGetTotalEnergyConsumption``), which moves only about
every 100 ms; they differ in where a window's edges fall on it. In one window of ``check_window``:

1. ``ours``: ``calibration.energy``'s method. The window opens on a counter update and closes on
   the first update after the work; the idle margins (before the work starts, after it ends) are
   charged at the measured idle power and subtracted.
2. ``zeus``: a ``ZeusMonitor`` window around the work alone, as a user writes it
   (``begin_window``, the work, ``end_window``). Each edge reads the counter as it last updated,
   so the window it reports is the work's, shifted back by the counter's age at each edge: it
   takes in idle time before the work and misses up to one update period of the work's end.
   The work starts a random fraction of an update period after the counter moves, as it would
   in a user's program.
3. ``zeus_aligned``: a second ``ZeusMonitor`` window on our edges (opened just after our
   opening update, closed just after our closing one), less the same idle margins: the same
   counter readings as ours through Zeus's code, so it differs from ours only if the two read
   the counter differently.
4. ``power_integral``: the board's instantaneous power (NVML) sampled every ``sample_every_s``
   on a thread and integrated over the work's own interval: a meter independent of the counter.
"""
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from calibration.energy import _counter_energy_j, check_idle_power_w, check_window_s, wait_for_counter_update
from calibration.validate import check_meter
from costmodel.validate import count, finite_number

if TYPE_CHECKING:  # annotations only: no import at run time
    from zeus.monitor import ZeusMonitor

    from calibration.nvml_meter import GpuMeter

METHODS = ("ours", "zeus", "zeus_aligned", "power_integral")
AGREEMENT = 0.01  # the bound on |ours / zeus - 1|


class PowerSampler:
    """Instantaneous board power every ``sample_every_s`` on a thread: [(host time s, W)]."""

    def __init__(self, meter, sample_every_s):
        self.meter, self.sample_every_s = meter, sample_every_s
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            reading = self.meter.read()
            if reading.power_instant_w is not None:
                self.samples.append((reading.time_s, reading.power_instant_w))
            self._stop.wait(self.sample_every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def integral_j(samples: "list[tuple[float, float]]", t0: float, t1: float) -> "float | None":
    """Trapezoid integral (J) of (time s, W) samples over [t0, t1] s (each end held at its nearest sample);
    None with fewer than two samples inside."""
    t0, t1 = finite_number("t0", t0), finite_number("t1", t1)
    if t1 < t0:
        raise ValueError(f"t1 ({t1}) must be at or after t0 ({t0})")
    inside = [(t, w) for t, w in samples if t0 <= t <= t1]
    if len(inside) < 2:
        return None
    inside = [(t0, inside[0][1])] + inside + [(t1, inside[-1][1])]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2.0 for a, b in zip(inside, inside[1:]))


def check_window(meter: "GpuMeter", zeus: "ZeusMonitor", gpu_index: int, run_for: "Callable[[float], int]",
                 window_s: float, idle_power_w: float, rng: random.Random, sample_every_s: float = 0.01) -> dict:
    """One window of ``run_for(seconds) -> calls`` measured by every method: {method: J of the
    work}, plus ``calls`` and ``work_s``. ``zeus`` is a ``zeus.monitor.ZeusMonitor`` (or any object
    with its ``begin_window``/``end_window``) watching ``gpu_index``."""
    check_meter("meter", meter)
    if not all(callable(getattr(zeus, call, None)) for call in ("begin_window", "end_window")):
        raise TypeError(f"zeus must be a zeus.monitor.ZeusMonitor (begin_window, end_window), "
                        f"got {type(zeus).__name__}")
    window_s, idle_power_w = check_window_s(window_s), check_idle_power_w(idle_power_w)
    with PowerSampler(meter, sample_every_s) as sampler:
        start = wait_for_counter_update(meter)
        zeus.begin_window("aligned", sync_execution=True)
        time.sleep(rng.uniform(0.0, 0.1))  # the work starts at a random phase of the counter
        zeus.begin_window("user", sync_execution=True)
        t0 = time.monotonic()
        calls = run_for(window_s)
        t_end = time.monotonic()
        user = zeus.end_window("user", sync_execution=True)
        end = wait_for_counter_update(meter)
        aligned = zeus.end_window("aligned", sync_execution=False)
    idle_j = idle_power_w * ((t0 - start.time_s) + (end.time_s - t_end))
    return {"ours": _counter_energy_j(start, end) - idle_j, "zeus": user.gpu_energy[gpu_index],
            "zeus_aligned": aligned.gpu_energy[gpu_index] - idle_j,
            "power_integral": integral_j(sampler.samples, t0, t_end), "calls": int(calls), "work_s": t_end - t0}


def check_workload(meter: "GpuMeter", zeus: "ZeusMonitor", gpu_index: int, run_for: "Callable[[float], int]",
                   idle_power_w: float, window_s: float = 3.0, trials: int = 5, seed: int = 0) -> dict:
    """``trials`` (>= 1) windows of one workload: each method's J per window, and the medians of
    every method's ratio to ``ours``."""
    count("trials", trials)
    check_window_s(window_s)
    rng = random.Random(seed)
    windows = [check_window(meter, zeus, gpu_index, run_for, window_s, idle_power_w, rng) for _ in range(trials)]
    return {"windows": windows, "power_w": statistics.median(w["ours"] / w["work_s"] for w in windows),
            "vs_ours": {m: _median_ratio(windows, m) for m in METHODS if m != "ours"}}


def _median_ratio(windows, method):
    ratios = [w[method] / w["ours"] for w in windows if w[method] is not None]
    return statistics.median(ratios) if ratios else None


def verdict(workloads: dict) -> dict:
    """Do ours and Zeus agree within ``AGREEMENT`` on every workload, and which is nearer the power integral?"""
    gaps = {name: None if w["vs_ours"]["zeus"] is None else w["vs_ours"]["zeus"] - 1.0 for name, w in workloads.items()}
    nearer = {}
    for name, w in workloads.items():
        integral = w["vs_ours"]["power_integral"]
        if integral is not None and w["vs_ours"]["zeus"] is not None:
            nearer[name] = "ours" if abs(integral - 1.0) <= abs(integral - w["vs_ours"]["zeus"]) else "zeus"
    return {"rule": f"|zeus / ours - 1| <= {AGREEMENT:g} on every workload",
            "agree": all(g is not None and abs(g) <= AGREEMENT for g in gaps.values()) if gaps else None,
            "zeus_minus_ours": gaps, "nearer_the_power_integral": nearer}
