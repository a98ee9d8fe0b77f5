"""Gradients for the forward-only Triton ops, by recomputing their torch reference.

The forward runs our kernel; the backward re-runs the pure-torch reference under autograd and
differentiates it. This is correct but not fused: attention's backward materialises the
[S_q, S_kv] score matrix. It exists so that training and test-time training get true gradients
instead of a silently detached output.
"""
from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import FunctionCtx


class _KernelForwardReferenceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, kernel_fn: Callable[..., torch.Tensor], reference_fn: Callable[..., torch.Tensor],
                *inputs: torch.Tensor) -> torch.Tensor:
        ctx.reference_fn = reference_fn
        ctx.save_for_backward(*inputs)
        return kernel_fn(*inputs)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *reference_gradients(ctx.reference_fn, ctx.saved_tensors, ctx.needs_input_grad[2:],
                                                 grad_out))


def reference_gradients(reference_fn: Callable[..., torch.Tensor], inputs: Sequence[object], needs_grad: Sequence[bool],
                        grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``reference_fn(*inputs)`` against ``grad_out`` for each tensor input whose
    ``needs_grad`` is set (None for the others and for non-tensor inputs): the backward of every
    kernel op here and in ``kernels._library``."""
    args = [value.detach().requires_grad_(bool(need)) if isinstance(value, torch.Tensor) else value
            for value, need in zip(inputs, needs_grad)]
    wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad():
        out = reference_fn(*args)
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return tuple(next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)


def apply_with_reference_grad(kernel_fn: Callable[..., torch.Tensor], reference_fn: Callable[..., torch.Tensor],
                              *inputs: torch.Tensor) -> torch.Tensor:
    """Run ``kernel_fn(*inputs)``; if any input needs a gradient, backpropagate via ``reference_fn``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _KernelForwardReferenceBackward.apply(kernel_fn, reference_fn, *inputs)
    return kernel_fn(*inputs)
