"""Each cost-model op as a no-argument call of our kernel on random data, for the sweep's graphs."""
import dataclasses
from collections.abc import Callable

import torch

from costmodel.ops import SEQUENCE_OPS, ModelDims, check_op
from costmodel.validate import count


def op_callable(op: str, batch_size: int, dims: "ModelDims", device: "torch.device | str" = "cuda",
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Callable[[], object]:
    """A no-argument, graph-capturable call of our kernel for ``op`` (of ``costmodel.ops.OPS``) at ``batch_size``
    (an int >= 1) at ``dims``, on random data."""
    check_op(op)
    batch_size = count("batch_size", batch_size)
    if not isinstance(dims, ModelDims):
        raise TypeError(f"dims must be a costmodel.ops.ModelDims, got {type(dims).__name__}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        # drawn in ``dtype`` and scaled in place: a float32 draw and its scaled copy of 256 experts' 7168 x 4096
        # gate_up weight (15 GB in bf16) took 60 GB and ran an 80 GB H100 out of memory in the 2026-12-07 sweep
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(scale)
    if op in SEQUENCE_OPS:
        return _attention_call(op, randn(batch_size, dims.n_heads, dims.seq_len, dims.head_dim),
                               *(randn(batch_size, dims.n_heads, dims.seq_len, dims.head_dim) for _ in range(2)))
    if op in ("moe_router", "fused_experts", "fused_experts_fp8"):
        return _moe_call(op, randn(batch_size, dims.d_model), dims, randn)
    if op == "expert_ffn_fp8":  # one expert, every token routed to it
        return _moe_call("fused_experts_fp8", randn(batch_size, dims.d_model),
                         dataclasses.replace(dims, num_experts=1, top_k=1), randn)
    if op == "quantize_fp8":
        import kernels
        x = randn(batch_size, dims.d_model)
        return lambda: kernels.quantize_fp8(x)
    return _dense_call(op, batch_size, dims, randn)


def _attention_call(op, q, k, v):
    import kernels
    if op == "attention_qk":
        return lambda: kernels.attention_qk(q, k)
    if op == "attention_av":
        scores = kernels.attention_qk(q, k)
        return lambda: kernels.attention_av(scores, v, causal=True)
    return lambda: kernels.flash_attention(q, k, v, causal=True)


def _dense_call(op, batch_size, dims, randn):
    import kernels
    H, I = dims.d_model, dims.d_ff
    if op == "ffn_down":
        h, down = randn(batch_size, I), randn(H, I, scale=I ** -0.5)
        return lambda: kernels.ffn_down(h, down)
    x = randn(batch_size, H)
    if op == "rms_norm":  # torch's kernel: the one the harness's models run
        norm_weight = randn(H)
        return lambda: torch.nn.functional.rms_norm(x, (H,), norm_weight)
    if op == "residual_add":  # torch's elementwise add, as in the models' residual stream
        y = randn(batch_size, H)
        return lambda: x + y
    projections = {"qkv_projection": (3 * H, H), "output_projection": (H, H), "lm_head": (dims.vocab_size, H)}
    if op in projections:
        weight = randn(*projections[op], scale=H ** -0.5)
        return lambda: kernels.matmul(x, weight)
    gate_up, down = randn(2 * I, H, scale=H ** -0.5), randn(H, I, scale=I ** -0.5)
    return {"ffn_gate": lambda: kernels.ffn_gate(x, gate_up), "ffn_up": lambda: kernels.ffn_up(x, gate_up),
            "swiglu_gate_up": lambda: kernels.swiglu_gate_up(x, gate_up),
            "swiglu_ffn": lambda: kernels.swiglu_ffn(x, gate_up, down)}[op]


def _moe_call(op, x, dims, randn):
    import kernels
    H, I, E = dims.d_model, dims.d_ff, dims.num_experts
    router = kernels.TopKRouter(randn(E, H), dims.top_k)
    if op == "moe_router":
        return lambda: router(x)
    gate_up, down = randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5)
    with torch.no_grad():
        _, weights, ids = router(x)
    if op == "fused_experts_fp8":
        fp8_weights = (*kernels.quantize_fp8_weights(gate_up), *kernels.quantize_fp8_weights(down))
        del gate_up, down  # the bf16 copies are not needed while the FP8 ones are timed
        return lambda: kernels.fp8_experts(x, *fp8_weights, ids, weights, validate_ids=False)
    return lambda: kernels.fused_experts(x, gate_up, down, ids, weights, validate_ids=False)
