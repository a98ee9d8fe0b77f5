"""Our kernels as ``torch.library`` custom ops (namespace ``energy_moe``), so ``torch.compile`` traces around them.

An op is opaque to Dynamo: it never sees the launcher's config lookup or its Triton launch, only
the op's schema and its fake implementation (shapes and dtypes, for tracing). Autograd, where an
op has it, differentiates the op's torch reference (as ``kernels._autograd`` does for the others):
correct, not fused. ``torch.ops.energy_moe.<name>`` is each op; the public functions validate
their arguments and then call it.

Outside any tracing, a call that records no gradient skips the op's dispatch and launches directly
(``KernelOp``): the dispatch cost 14 µs of host time a ``fused_experts`` call on a CPU-only
machine (launches stubbed), a large share of an eager decode step outside a CUDA graph. Dynamo,
export and every other tracer still see the op.
"""
from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx

from kernels._autograd import reference_gradients

NAMESPACE = "energy_moe"
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class KernelOp:
    """A registered op and its launcher: ``op(*args)`` launches directly where ``runs_untraced``
    holds, else calls the op (``torch.ops.energy_moe.<name>``)."""

    def __init__(self, op: torch.library.CustomOpDef, launcher: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]):
        self.op, self.launcher = op, launcher

    def __call__(self, *args):
        return self.launcher(*args) if runs_untraced(args) else self.op(*args)


def runs_untraced(args: tuple) -> bool:
    """Whether a call with ``args`` needs nothing of its op: no tracer is active (Dynamo, a dispatch
    mode such as export's fake or functional tensors, functorch, TorchScript's tracer), its tensors
    are plain ones on a real device, and none needs a gradient recorded."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state()):
        return False
    grad = torch.is_grad_enabled()
    return all(type(a) in PLAIN_TENSOR_TYPES and not a.is_meta and not (grad and a.requires_grad)
               for a in args if isinstance(a, torch.Tensor))


def kernel_op(name: str, schema: str, launcher: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
              fake: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
              reference: Callable[..., torch.Tensor] | None = None) -> KernelOp:
    """Register ``launcher`` as ``energy_moe::<name>`` with ``schema`` ("(Tensor x, ...) -> Tensor"),
    ``fake`` for tracing and, with a ``reference``, autograd through it; the op's callable."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", launcher, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if reference is not None:
        op.register_autograd(_reference_backward(reference), setup_context=_save_inputs)
    return KernelOp(op, launcher)


def _save_inputs(ctx, inputs, output):
    ctx.tensor_at = [i for i, value in enumerate(inputs) if isinstance(value, torch.Tensor)]
    ctx.constants = [None if isinstance(value, torch.Tensor) else value for value in inputs]
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))


def _reference_backward(reference):
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = list(ctx.constants)
        for i, saved in zip(ctx.tensor_at, ctx.saved_tensors):
            inputs[i] = saved
        return reference_gradients(reference, inputs, ctx.needs_input_grad, grad_out)
    return backward
