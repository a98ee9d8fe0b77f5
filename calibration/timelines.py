"""A sweep's NVML timelines across ``--resume``: each run's readings kept beside the partial sweep.

The device's 10-minute call limit cuts a full sweep (about 9 minutes of points on an H100, plus its
constants) once in a while just before it writes its table; the run that resumes it measures a few
points, and its own timeline is too short to fit the thermal model (2026-12-07: 1.3 s). So every
``SAVE_EVERY_S`` the running sweep writes its timeline (``calibration.trace.trace_of``) to
``<output>.timeline.json`` beside the earlier runs' timelines, and the table's thermal fit and trace come
from the run with the most temperature readings.
"""
import json
import math
import time
from pathlib import Path

from calibration.nvml_meter import BackgroundSampler, GpuMeter, GpuReading
from calibration.results import write_json_atomic
from calibration.trace import trace_of

SAVE_EVERY_S = 30.0  # a cut run loses at most this much of its timeline


def timeline_path(output: Path) -> Path:
    """Where the runs' timelines of the sweep writing ``output`` are kept until its table is written."""
    return output.with_suffix(".timeline.json")


class RunTimelines:
    """The timelines of a sweep's earlier runs (read from ``path`` when ``run``, this run's number from 1,
    is not the first) and of this one."""

    def __init__(self, path: Path, run: int):
        self.path, self.run = path, run
        self.earlier = self._read() if run > 1 else []
        self._saved_at_s = -math.inf

    def _read(self):
        try:
            return list(json.loads(self.path.read_text())["runs"])
        except (OSError, ValueError, KeyError, TypeError):  # none kept (a sweep from before), or unreadable
            return []

    def keep(self, meter: GpuMeter, sampler: BackgroundSampler) -> None:
        """Write this run's timeline beside the earlier ones, at most every ``SAVE_EVERY_S``."""
        if sampler.samples and time.monotonic() - self._saved_at_s >= SAVE_EVERY_S:
            write_json_atomic(self.path, {"runs": self.earlier + [self._trace(meter, sampler)]})
            self._saved_at_s = time.monotonic()

    def longest(self, meter: GpuMeter, sampler: BackgroundSampler) -> "tuple[list[GpuReading], dict | None]":
        """(readings, trace) of the run with the most temperature readings, this run included (the trace's
        ``run`` says which); ([], None) when no run has a reading."""
        runs = self.earlier + ([self._trace(meter, sampler)] if sampler.samples else [])
        if not runs:
            return [], None
        trace = max(runs, key=lambda t: sum(r.get("temperature_c") is not None for r in t["readings"]))
        return [GpuReading(**r) for r in trace["readings"]], trace

    def _trace(self, meter, sampler):
        return trace_of(meter, sampler) | {"run": self.run}

    def discard(self) -> None:
        """The table is written: the timelines are its trace's now."""
        self.path.unlink(missing_ok=True)
