"""Kernels that read a small pinned host tensor in place (zero copy), such as the monitor's [3] state.

Page-locked host memory lies in the GPU's unified virtual address space, so a Triton kernel given
a pinned CPU tensor loads it over PCIe at run time. Inside a CUDA graph each replay then reads the
live host values, with no copy node: for the routers, one host-to-device copy saved per layer
call (measured in ``bench.router_overhead``'s ``state_copy`` row). Whether a given Triton and
driver accept such a pointer is probed once per device (``device_reads_pinned``); callers copy
where it says no.
"""
import torch
import triton
import triton.language as tl

PROBE_VALUES = (1.5, -2.25, 3.0e5, 7.0)  # distinct, exact in float32


@triton.jit
def _copy_kernel(p_src, p_dst, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(p_dst + o, tl.load(p_src + o))


def device_reads_pinned(device: torch.device | str) -> bool:
    """Can a Triton kernel on ``device`` load a pinned host tensor in place? True on a CPU device
    (the interpreter reads host memory anyway); on CUDA, probed once per device (a kernel launch
    and a sync). During a graph capture the probe cannot run: an unprobed device answers False."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    index = _index(device)
    if index not in PROBED and not torch.cuda.is_current_stream_capturing():
        PROBED[index] = _probe(index)
    return PROBED.get(index, False)


PROBED = {}  # CUDA device index -> the probe's answer


def _probe(index):
    source = torch.tensor(PROBE_VALUES, dtype=torch.float32).pin_memory()
    target = torch.full_like(source, float("nan"), device=f"cuda:{index}")
    try:
        with torch.cuda.device(index):
            _copy_kernel[(1,)](source, target, N=len(PROBE_VALUES))
            torch.cuda.synchronize(index)
    except Exception:  # this Triton or driver rejects host pointers: callers copy instead
        return False
    return torch.equal(target.cpu(), source)


def readable_in_place(state: torch.Tensor, device: torch.device | str) -> bool:
    """Does a kernel on ``device`` read ``state`` where it lies (on ``device``, or pinned host
    memory this device's kernels can load)?"""
    device = torch.device(device)
    if state.device.type == device.type and (device.type != "cuda" or state.device.index == _index(device)):
        return True
    return device.type == "cuda" and state.device.type == "cpu" and state.is_pinned() and device_reads_pinned(device)


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()
