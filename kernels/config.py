"""Block-size configs, read from one JSON file per op and GPU name, with fallbacks by architecture.

``configs/<op>/<GPU_name>.json`` (e.g. ``NVIDIA_H100_80GB_HBM3.json``) holds the tuned entries
for one card, with the ``compute_capability`` it was tuned on. A device without its own file takes
a tuned file of its compute capability (an H200 the H100's; the first by file name where several
match), and any other device ``configs/<op>/default.json``. Which file an op uses is logged once
(``logging`` debug, logger ``kernels``) and reported by ``config_sources`` for results files. Each file is
``{"entries": [{"when": {"max_m": 64}, "config": {...}}, ...]}``; the first entry whose
``when`` bounds (``max_<dim>`` and ``min_<dim>``, inclusive) all hold is used, so files end
with an unconditional entry. Lookups pass the shape dims and ``elem_bytes``: tuned (16-bit)
entries carry ``max_elem_bytes: 2`` so fp32, whose tiles need twice the shared memory, falls
through to the default entries. No autotuning happens at call time: ``python -m
bench.tune_kernels`` and ``python -m bench.tune_moe`` measure candidates to write these.
"""
import functools
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
LOG = logging.getLogger("kernels")


def device_name(device: torch.device | str) -> str:
    """NVML-style GPU name for a CUDA device, or ``"cpu"``."""
    return _device_identity(device)[0]


def _device_identity(device):
    """(GPU name, "major.minor" compute capability) of a CUDA device; ("cpu", None) otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device, a device string or a CUDA index, got {device!r}") from None
    if device.type != "cuda":
        return "cpu", None
    if device.index is None and not torch.cuda.is_available():
        raise ValueError("device is cuda but no CUDA device is available")
    return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_identity(index):  # cached: the queries cost microseconds on every launch
    if not torch.cuda.is_available():
        raise ValueError(f"device is cuda:{index} but no CUDA device is available")
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def config_file_stem(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def load_entries(op: str, gpu_name: str, compute_capability: str | None = None) -> tuple[tuple[dict, ...], Path]:
    """The config entries for ``op`` on ``gpu_name`` (of ``compute_capability``, "9.0"), and the
    path they came from: the GPU's own file, else a tuned file of the same capability, else the default."""
    if op not in config_ops():
        raise ValueError(f"op {op!r} has no block configs; expected one of {', '.join(config_ops())}")
    path = CONFIG_DIR / op / f"{config_file_stem(gpu_name)}.json"
    if not path.exists():
        path = _same_architecture(op, compute_capability) or CONFIG_DIR / op / "default.json"
    LOG.debug("kernels: %s on %s (compute capability %s) uses %s", op, gpu_name, compute_capability, path.name)
    return tuple(json.loads(path.read_text())["entries"]), path


def config_ops() -> tuple[str, ...]:
    """The ops with block configs: the folders of ``configs``."""
    return tuple(sorted(path.name for path in CONFIG_DIR.iterdir() if path.is_dir()))


def _same_architecture(op, compute_capability):
    if compute_capability is None:
        return None
    for path in sorted((CONFIG_DIR / op).glob("*.json")):
        if path.name != "default.json" and json.loads(path.read_text()).get("compute_capability") == compute_capability:
            return path
    return None


def config_sources(device: torch.device | str) -> dict[str, str]:
    """{op: the config file it uses on ``device``}, for results files."""
    identity = _device_identity(device)
    return {op: load_entries(op, *identity)[1].name for op in config_ops()}


def config_entries(device: torch.device | str) -> dict[str, dict]:
    """{op: {"file": the config file it uses on ``device``, "entries": its entries}}: what a cost
    table carries so the cost model knows the tiles our kernels pick (``costmodel.shapes``)."""
    identity = _device_identity(device)
    return {op: {"file": load_entries(op, *identity)[1].name, "entries": list(load_entries(op, *identity)[0])}
            for op in config_ops()}


def _holds(key, bound, dims):
    kind, _, dim = key.partition("_")
    if dim not in dims:
        raise ValueError(f"a config entry bounds {dim!r}, which the lookup's dims {sorted(dims)} lack")
    return dims[dim] <= bound if kind == "max" else dims[dim] >= bound


def select_config(entries: Iterable[dict], **dims: int) -> dict:
    """The ``config`` of the first entry whose ``max_<dim>``/``min_<dim>`` bounds all hold for ``dims``."""
    for entry in entries:
        if all(_holds(key, bound, dims) for key, bound in entry.get("when", {}).items()):
            return entry["config"]
    raise ValueError(f"no config entry matches {dims}; the file must end with an entry without 'when'")


def lookup(op: str, device: torch.device | str, **dims: int) -> dict:
    """The block config dict for ``op`` at ``dims`` on ``device`` (shared: never modify it)."""
    return _cached_lookup(op, *_device_identity(device), tuple(sorted(dims.items())))


def lookup_each(ops: tuple[str, ...], device: torch.device, **dims: int) -> tuple[dict, ...]:
    """``lookup`` of each of ``ops`` at the same ``dims`` in one cached call (an eager decode step
    asks the same every layer; ``device`` a ``torch.device``)."""
    return _cached_lookup_each(ops, device, tuple(dims.items()))


@functools.lru_cache(maxsize=4096)
def _cached_lookup_each(ops, device, dims):
    return tuple(lookup(op, device, **dict(dims)) for op in ops)


@functools.lru_cache(maxsize=4096)
def _cached_lookup(op, gpu_name, compute_capability, dims):
    """Once per (op, GPU, shape): a decode loop asks the same question every call."""
    entries, _ = load_entries(op, gpu_name, compute_capability)
    return select_config(entries, **dict(dims))
