"""Argument checks shared by the public ops: launchers validate, kernels compute.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or
value) whose message names the offending argument, so bad input never reaches Triton.
"""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name, value, ndim=None, dtypes=FLOAT_DTYPES):
    """Check that ``value`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of {allowed}")
    if ndim is not None and value.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} is on {value.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")


def check_same_dtype_device(**tensors):
    """Check that all named tensors share the first one's dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {first_name} has {first.dtype}")
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")


def check_dim(name, value, dim, expected, what):
    """Check ``value.shape[dim] == expected``; ``what`` says where ``expected`` comes from."""
    if value.shape[dim] != expected:
        raise ValueError(f"{name} has size {value.shape[dim]} in dim {dim}; expected {expected} ({what}), "
                         f"got shape {tuple(value.shape)}")


def dot_precision(dtype):
    """fp32 inputs get exact fp32 products; Triton's default would silently use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_compatible(*tensors):
    """Tensor descriptors need a unit last stride and 16-byte aligned base and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors)
