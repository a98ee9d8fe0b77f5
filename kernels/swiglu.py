"""SwiGLU FFN: ``down(silu(x @ W_gate.T) * (x @ W_up.T))``, on the Triton GEMM.

``gate_up_proj`` is [2I, H] with the I gate rows first (the transformers 5.x expert layout);
``down_proj`` is [H, I]. ``swiglu_ffn`` is the fused path models run: one GEMM whose epilogue
applies SiLU(gate)·up, then the down projection. ``ffn_gate``, ``ffn_up`` and ``ffn_down``
launch the three projections alone so the cost model can calibrate each.
"""
import torch
import torch.nn.functional as F

from kernels._autograd import apply_with_reference_grad
from kernels._library import kernel_op
from kernels.validate import check_dim, check_same_dtype_device, check_tensor
from kernels.matmul import _matmul_2d, as_rows, check_projection, launch_matmul, matmul_reference


def _check_gate_up(x, gate_up_proj):
    check_projection("x", x, "gate_up_proj", gate_up_proj)
    if gate_up_proj.shape[0] % 2:
        raise ValueError(f"gate_up_proj must have an even number of rows (gate rows, then up rows), "
                         f"got shape {tuple(gate_up_proj.shape)}")


def _gate_rows(gate_up_proj):
    return gate_up_proj[: gate_up_proj.shape[0] // 2]


def _up_rows(gate_up_proj):
    return gate_up_proj[gate_up_proj.shape[0] // 2:]


def swiglu_gate_up_reference(x: torch.Tensor, gate_up_proj: torch.Tensor) -> torch.Tensor:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` in torch."""
    return F.silu(x @ _gate_rows(gate_up_proj).T) * (x @ _up_rows(gate_up_proj).T)


def swiglu_ffn_reference(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The whole SwiGLU FFN in torch."""
    return swiglu_gate_up_reference(x, gate_up_proj) @ down_proj.T


def _swiglu_gate_up_2d(x, gate_up_proj):
    h = launch_matmul(as_rows(x), gate_up_proj, fuse_swiglu=True)
    return h.reshape(*x.shape[:-1], gate_up_proj.shape[0] // 2)


def _swiglu_ffn_2d(x, gate_up_proj, down_proj):
    return _matmul_2d(_swiglu_gate_up_2d(x, gate_up_proj), down_proj)


_swiglu_ffn_op = kernel_op("swiglu_ffn", "(Tensor x, Tensor gate_up_proj, Tensor down_proj) -> Tensor", _swiglu_ffn_2d,
                           fake=lambda x, gate_up_proj, down_proj: torch.empty_like(x),
                           reference=swiglu_ffn_reference)


def swiglu_gate_up(x: torch.Tensor, gate_up_proj: torch.Tensor) -> torch.Tensor:
    """Fused gate+up projection with SiLU(gate)·up in the GEMM epilogue.

    Args:
        x: [..., H].
        gate_up_proj: [2I, H], gate rows first; same dtype and device as ``x``.
    Returns:
        [..., I] in ``x``'s dtype.
    """
    _check_gate_up(x, gate_up_proj)
    return apply_with_reference_grad(_swiglu_gate_up_2d, swiglu_gate_up_reference, x, gate_up_proj)


def swiglu_ffn(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN: fused gate+up+SiLU·up, then the down projection.

    Args:
        x: [..., H] float32, float16 or bfloat16.
        gate_up_proj: [2I, H], gate rows first.
        down_proj: [H, I].
    Returns:
        [..., H] in ``x``'s dtype.
    """
    _check_gate_up(x, gate_up_proj)
    check_tensor("down_proj", down_proj, ndim=2)
    check_same_dtype_device(x=x, down_proj=down_proj)
    check_dim("down_proj", down_proj, 0, x.shape[-1], "the last dim of x")
    check_dim("down_proj", down_proj, 1, gate_up_proj.shape[0] // 2, "half the rows of gate_up_proj")
    return _swiglu_ffn_op(x, gate_up_proj, down_proj)


def ffn_gate(x: torch.Tensor, gate_up_proj: torch.Tensor) -> torch.Tensor:
    """The gate projection alone: ``x @ gate_up_proj[:I].T``, ``x`` [..., H] -> [..., I]."""
    _check_gate_up(x, gate_up_proj)
    return apply_with_reference_grad(_matmul_2d, matmul_reference, x, _gate_rows(gate_up_proj))


def ffn_up(x: torch.Tensor, gate_up_proj: torch.Tensor) -> torch.Tensor:
    """The up projection alone: ``x @ gate_up_proj[I:].T``, ``x`` [..., H] -> [..., I]."""
    _check_gate_up(x, gate_up_proj)
    return apply_with_reference_grad(_matmul_2d, matmul_reference, x, _up_rows(gate_up_proj))


def ffn_down(h: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The down projection alone: ``h @ down_proj.T``, ``h`` [..., I], ``down_proj`` [H, I] -> [..., H]."""
    check_projection("h", h, "down_proj", down_proj)
    return apply_with_reference_grad(_matmul_2d, matmul_reference, h, down_proj)
