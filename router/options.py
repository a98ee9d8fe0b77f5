"""The energy-aware router's arguments, checked: each rule's failure names the argument."""
import math
from collections.abc import Mapping

import torch
from torch import nn

from kernels.moe_layer import TopKRouter
from kernels.validate import FLOAT_DTYPES, check_int, check_tensor

OBJECTIVE_KEYS = ("energy", "latency", "quality")
DEFAULT_OBJECTIVE_WEIGHTS = {"energy": 1.0, "latency": 0.0, "quality": 1.0}


def check_sizes(**sizes: object) -> list[int]:
    """Each size as a Python int >= 1 (numpy integers too)."""
    return [check_int(name, value, 1) for name, value in sizes.items()]


def finite_number(name: str, value: object, low: float, low_open: bool = False, high: float = math.inf,
                  high_open: bool = True) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number in the span."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (low_open and value == low) or value > high or (high_open and value == high):
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")


def check_keep(keep_top_k: "int | None", keep_share: "float | None", top_k: int) -> "tuple[int | None, float | None]":
    """(keep_top_k, keep_share): at most one set; keep_top_k in [1, top_k], keep_share in (0, 1]."""
    if keep_top_k is not None and keep_share is not None:
        raise ValueError(f"keep_top_k and keep_share are two forms of one knob: give at most one, got "
                         f"{keep_top_k!r} and {keep_share!r}")
    if keep_top_k is not None:
        keep_top_k = check_int("keep_top_k", keep_top_k, 1, top_k)
    if keep_share is not None:
        finite_number("keep_share", keep_share, 0.0, low_open=True, high=1.0, high_open=False)
        keep_share = float(keep_share)
    return keep_top_k, keep_share


def check_objective_weights(objective_weights: "dict | None") -> dict:
    """{energy, latency, quality} as floats: the defaults updated by ``objective_weights``."""
    weights = dict(DEFAULT_OBJECTIVE_WEIGHTS)
    if objective_weights is not None and not isinstance(objective_weights, Mapping):
        raise TypeError(f"objective_weights must be a dict of {list(OBJECTIVE_KEYS)} weights or None, "
                        f"got {type(objective_weights).__name__}")
    if objective_weights is not None:
        unknown = set(objective_weights) - set(OBJECTIVE_KEYS)
        if unknown:
            raise ValueError(f"objective_weights has unknown keys {sorted(unknown)}; expected {list(OBJECTIVE_KEYS)}")
        weights.update(objective_weights)
    for key, value in weights.items():
        finite_number(f"objective_weights[{key!r}]", value, 0.0)
    if (weights["energy"] > 0 or weights["latency"] > 0) and weights["quality"] == 0:
        raise ValueError("objective_weights['quality'] must be > 0 when a cost weight is set: the largest "
                         "probability gap a re-route may cross is 1 / quality")
    return {k: float(v) for k, v in weights.items()}


def check_hyperparameters(energy_aware_lr: float, top_p: "float | None", thermal_gain: float, thermal_margin_c: float,
                          max_memory_pressure: float) -> None:
    """The step size, dynamic k and the thermal and pressure knobs, each in its range."""
    finite_number("energy_aware_lr", energy_aware_lr, 0.0, low_open=True)
    if top_p is not None:
        finite_number("top_p", top_p, 0.0, low_open=True, high=1.0, high_open=False)
    finite_number("thermal_gain", thermal_gain, 0.0)
    finite_number("thermal_margin_c", thermal_margin_c, 0.0, low_open=True)
    finite_number("max_memory_pressure", max_memory_pressure, 0.0, high=1.0)


def gate_weight(weight: "torch.Tensor | None", d_model: int, num_experts: int, device: "torch.device | str | None",
                dtype: "torch.dtype | None") -> torch.Tensor:
    """The [E, H] gate weight: ``weight`` checked (shared, not copied), or a new one with nn.Linear's init."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if weight is None:
        weight = torch.empty(num_experts, d_model, device=_device(device), dtype=dtype or torch.float32)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default init
        return weight
    check_tensor("weight", weight, ndim=2, kernel_device=False)
    if tuple(weight.shape) != (num_experts, d_model):
        raise ValueError(f"weight must be [num_experts, d_model] = [{num_experts}, {d_model}], "
                         f"got {tuple(weight.shape)}")
    if device is not None or dtype is not None:
        raise ValueError("device and dtype are for a new weight; a given weight keeps its own")
    return weight


def _device(device):
    """``device`` as a torch.device present on this machine, or None; ValueError naming it otherwise."""
    if device is None:
        return None
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # well named but absent here (no CUDA, or no such index)
    except (RuntimeError, TypeError, AssertionError):
        raise ValueError(f"device must be a torch device present here, such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    return device


def check_topk_router(router: object) -> None:
    """The router a ``from_router`` wraps: a ``kernels.TopKRouter``; TypeError naming it otherwise."""
    if not isinstance(router, TopKRouter):
        raise TypeError(f"router must be a kernels.TopKRouter (e.g. a patched model's layer.gate), "
                        f"got {type(router).__name__}")
