"""Gradients for the forward-only Triton ops, by recomputing their torch reference.

The forward runs our kernel; the backward re-runs the pure-torch reference under autograd and
differentiates it. This is correct but not fused: attention's backward materialises the
[S_q, S_kv] score matrix. It exists so that training and test-time training get true gradients
instead of a silently detached output.
"""
import torch


class _KernelForwardReferenceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel_fn, reference_fn, *inputs):
        ctx.reference_fn = reference_fn
        ctx.save_for_backward(*inputs)
        return kernel_fn(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = ctx.reference_fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (None, None, *(next(grads) if t.requires_grad else None for t in inputs))


def apply_with_reference_grad(kernel_fn, reference_fn, *inputs):
    """Run ``kernel_fn(*inputs)``; if any input needs a gradient, backpropagate via ``reference_fn``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _KernelForwardReferenceBackward.apply(kernel_fn, reference_fn, *inputs)
    return kernel_fn(*inputs)
