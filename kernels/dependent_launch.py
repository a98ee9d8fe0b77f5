"""Programmatic dependent launch (PDL; compute capability 9.0 and later) for the short kernels of a decode call.

A kernel launched with ``launch_pdl=True`` may start before the kernel ahead of it in the stream has
finished: once every program of that kernel has signalled (``gdc_launch_dependents``) or exited. Its
programs then wait (``gdc_wait``) until that kernel has completed and its writes are visible, before
their first load. What it hides is each launch's latency and ramp, which at decode is a good share of
a microsecond-scale kernel; CUDA graphs keep the dependency. Every kernel launched this way must call
``wait_for_prior_kernel`` before it reads or writes memory another kernel touches.

Off on CPUs (the interpreter), before compute capability 9.0, and with ``ENERGY_MOE_PDL=0``.
"""
import functools
import os

import torch
import triton
import triton.language as tl

PDL_ENV = "ENERGY_MOE_PDL"


def dependent_launch(device: torch.device) -> bool:
    """Whether our kernels on ``device`` launch with PDL (and wait for the kernel before them)."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    if device.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(device_index):
    return torch.cuda.get_device_capability(device_index)[0]


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has finished and its writes are visible, then let
    the next kernel launch (its programs wait in turn). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
