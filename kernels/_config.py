"""Block-size configs, read from one JSON file per op and GPU name, with a default fallback.

``configs/<op>/<GPU_name>.json`` (e.g. ``NVIDIA_H100_80GB_HBM3.json``) holds the tuned
entries for one card; ``configs/<op>/default.json`` serves every other device. Each file is
``{"entries": [{"when": {"max_m": 64}, "config": {...}}, ...]}``; the first entry whose
``when`` bounds (``max_<dim>`` and ``min_<dim>``, inclusive) all hold is used, so files end
with an unconditional entry. Lookups pass the shape dims and ``elem_bytes``: tuned (16-bit)
entries carry ``max_elem_bytes: 2`` so fp32, whose tiles need twice the shared memory, falls
through to the default entries. No autotuning happens at call time: ``python -m
bench.tune_kernels`` and ``python -m bench.tune_moe`` measure candidates to write these.
"""
import functools
import json
import re
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def device_name(device):
    """NVML-style GPU name for a CUDA device, or ``"cpu"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index):
    return torch.cuda.get_device_name(index)  # cached: the query costs microseconds on every launch


def config_file_stem(name):
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def load_entries(op, gpu_name):
    """The config entries for ``op`` on ``gpu_name``, and the path they came from."""
    path = CONFIG_DIR / op / f"{config_file_stem(gpu_name)}.json"
    if not path.exists():
        path = CONFIG_DIR / op / "default.json"
    return tuple(json.loads(path.read_text())["entries"]), path


def _holds(key, bound, dims):
    kind, _, dim = key.partition("_")
    return dims[dim] <= bound if kind == "max" else dims[dim] >= bound


def select_config(entries, **dims):
    """The ``config`` of the first entry whose ``max_<dim>``/``min_<dim>`` bounds all hold for ``dims``."""
    for entry in entries:
        if all(_holds(key, bound, dims) for key, bound in entry.get("when", {}).items()):
            return entry["config"]
    raise ValueError(f"no config entry matches {dims}; the file must end with an entry without 'when'")


def lookup(op, device, **dims):
    """The block config dict for ``op`` at ``dims`` on ``device``."""
    entries, _ = load_entries(op, device_name(device))
    return select_config(entries, **dims)
