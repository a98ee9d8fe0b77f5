"""Argument checks shared by the public ops: launchers validate, kernels compute.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or
value) whose message names the offending argument, so bad input never reaches Triton.
"""
import functools
import math
import numbers
import operator
import os

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # a float kernel argument's largest finite value
SM_SCALE_MAX = FLOAT32_MAX / math.log2(math.e)  # the attention kernels take sm_scale * log2(e) as a float32
# Triton reads TRITON_INTERPRET when it defines each kernel, i.e. when ``kernels`` is imported
INTERPRETER_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(name: str, value: object, ndim: int | tuple[int, ...] | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES, kernel_device: bool = True) -> None:
    """Check that ``value`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions, and (with
    ``kernel_device``, for a kernel's input; constructors may take weights still to be moved) on a
    device the Triton kernels can run on."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of {allowed}")
    if ndim is not None and value.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if kernel_device and value.device.type != "cuda":
        _check_interpretable(name, value)


def _check_interpretable(name, value):
    """A non-CUDA tensor runs under Triton's interpreter, which must have been on at import and
    which computes garbage in bfloat16."""
    if not INTERPRETER_AT_IMPORT:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError(f"{name} is on {value.device} and TRITON_INTERPRET=1 was set after `import kernels`; "
                             "Triton reads it when the kernels are defined, so set it before the first import")
        raise ValueError(f"{name} is on {value.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1, set before `import kernels`, for the CPU interpreter)")
    if value.device.type != "cpu":  # a meta tensor has no data for the interpreter to read
        raise ValueError(f"{name} is on {value.device}; the Triton kernels need a CUDA tensor, or a CPU one "
                         "under the interpreter")
    if value.dtype == torch.bfloat16:
        raise TypeError(f"{name} is bfloat16 on {value.device}: Triton's CPU interpreter computes bfloat16 "
                        "wrongly, so bfloat16 needs a CUDA GPU; use float32 or float16 on the CPU")


FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor cores and conversions: Ada and Hopper on


def gpu_has_fp8(index: int | None = None) -> bool:
    """Is there a CUDA GPU (``index``, default the current one) with FP8 (compute capability >= 8.9)?"""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= FP8_MIN_CAPABILITY


def check_fp8_device(name: str, value: torch.Tensor) -> None:
    """FP8 kernels need a CUDA tensor: Triton's CPU interpreter has no FP8 (a check ``torch.compile`` traces)."""
    if value.device.type != "cuda":
        raise ValueError(f"{name} is on {value.device}; the FP8 kernels need a CUDA GPU with FP8 (compute capability "
                         ">= 8.9): Triton's CPU interpreter has no FP8 (use the bf16 path, or the torch reference)")


def check_fp8_capability(name: str, value: torch.Tensor) -> None:
    """``check_fp8_device``, and the GPU's compute capability >= 8.9 (read once per device). The FP8
    launchers call it on every call, inside their custom ops, where ``torch.compile`` does not trace."""
    check_fp8_device(name, value)
    name_and_capability = _fp8_capability(value.device.index if value.device.index is not None
                                          else torch.cuda.current_device())
    if name_and_capability is not None:
        gpu, (major, minor) = name_and_capability
        raise ValueError(f"{name} is on {gpu} (compute capability {major}.{minor}), which has no FP8; the FP8 "
                         "kernels need 8.9 or newer")


@functools.lru_cache(maxsize=None)
def _fp8_capability(index):
    """None where device ``index`` has FP8, else (its name, its capability)."""
    capability = torch.cuda.get_device_capability(index)
    return None if capability >= FP8_MIN_CAPABILITY else (torch.cuda.get_device_name(index), capability)


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int (numpy and torch integer scalars too, never bool), in [low, high]."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dim() > 0):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a Python float (numpy reals too, never bool or str), finite, in [low, high]
    ((low, high] with ``low_open``): a scalar the kernels take as a float32 argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not (low < number if low_open else low <= number) or not number <= high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return number


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    """Check that all named tensors share the first one's dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {first_name} has {first.dtype}")
    check_same_device(**tensors)


def check_same_device(**tensors: torch.Tensor) -> None:
    """Check that all named tensors sit on the first one's device (any dtypes)."""
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")


def check_dim(name: str, value: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Check ``value.shape[dim] == expected``; ``what`` says where ``expected`` comes from."""
    if value.shape[dim] != expected:
        raise ValueError(f"{name} has size {value.shape[dim]} in dim {dim}; expected {expected} ({what}), "
                         f"got shape {tuple(value.shape)}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; Triton's default would silently use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need a unit last stride and 16-byte aligned base and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)


def check_sm_scale(sm_scale: float | None, head_dim: int) -> float:
    """The attention score scale as a float: ``None`` means 1/sqrt(head_dim); else |sm_scale| <= SM_SCALE_MAX."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    return check_float("sm_scale", sm_scale, -SM_SCALE_MAX, SM_SCALE_MAX)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool (numpy bools too; never an int or a string, which would mean something else)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)
