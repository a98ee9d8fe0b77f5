"""gpt-oss's experts on the fused-experts kernel (``kernels.fused_experts``).

Semantics are transformers' ``GptOssExperts.forward(hidden_states, router_indices, routing_weights)``:
[E, H, 2I] weights applied as ``x @ w`` with gate and up columns interleaved, biases added in the
kernel's epilogues, and the clamped GLU ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate <= limit
and |up| <= limit. The kernel reads the layout through strides (``ExpertWeights``): no copy.
"""
import torch

from kernels._library import kernel_op
from kernels.fused_experts import ExpertWeights, check_routing, run_experts
from kernels.validate import FLOAT32_MAX, check_dim, check_float, check_same_dtype_device, check_tensor


def gpt_oss_weights(gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor, down_proj: torch.Tensor,
                    down_proj_bias: torch.Tensor, alpha: float, limit: float) -> tuple[ExpertWeights, ExpertWeights]:
    """The kernel's view of gpt-oss's layout: ``gate_up_proj`` [E, H, 2I] (x @ w; gate and up
    columns interleaved: gate j at 2j, up j at 2j + 1) with its [E, 2I] bias, ``down_proj``
    [E, I, H] with its [E, H] bias; the clamped GLU."""
    return (ExpertWeights(gate_up_proj.transpose(1, 2)[:, 0::2], up_offset=gate_up_proj.stride(2),
                          bias=gate_up_proj_bias[:, 0::2], bias_up_offset=gate_up_proj_bias.stride(1), glu="clamped",
                          alpha=alpha, limit=limit),
            ExpertWeights(down_proj.transpose(1, 2), bias=down_proj_bias))


def gpt_oss_experts_reference(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor,
                              down_proj: torch.Tensor, down_proj_bias: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """transformers' ``GptOssExperts.forward`` in torch: per-expert loop, interleaved gate/up, clamped GLU."""
    out = torch.zeros_like(hidden_states)
    for expert in range(gate_up_proj.shape[0]):
        token, k = torch.where(top_k_index == expert)
        gate_up = hidden_states[token] @ gate_up_proj[expert] + gate_up_proj_bias[expert]
        gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
        y = ((up + 1) * gate * torch.sigmoid(gate * alpha)) @ down_proj[expert] + down_proj_bias[expert]
        out = out.index_add(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
    return out


def check_gpt_oss_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor,
                          down_proj: torch.Tensor, down_proj_bias: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, alpha: float, limit: float,
                          validate_ids: bool = True) -> tuple[float, float]:
    """Validate the ``gpt_oss_experts`` arguments; (alpha, limit) as floats."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    for name, t, ndim in (("gate_up_proj", gate_up_proj, 3), ("gate_up_proj_bias", gate_up_proj_bias, 2),
                          ("down_proj", down_proj, 3), ("down_proj_bias", down_proj_bias, 2)):
        check_tensor(name, t, ndim=ndim)
    check_same_dtype_device(hidden_states=hidden_states, gate_up_proj=gate_up_proj,
                            gate_up_proj_bias=gate_up_proj_bias, down_proj=down_proj, down_proj_bias=down_proj_bias)
    H = hidden_states.shape[1]
    E, _, two_i = gate_up_proj.shape
    check_dim("gate_up_proj", gate_up_proj, 1, H, "the hidden size of hidden_states")
    if E == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"gate_up_proj must be [E, H, 2I] with E, I >= 1 (gate and up columns interleaved), "
                         f"got shape {tuple(gate_up_proj.shape)}")
    for name, t, dims in (("gate_up_proj_bias", gate_up_proj_bias, (E, two_i)), ("down_proj", down_proj,
                          (E, two_i // 2, H)), ("down_proj_bias", down_proj_bias, (E, H))):
        if tuple(t.shape) != dims:
            raise ValueError(f"{name} must have shape {dims} (from gate_up_proj and hidden_states), "
                             f"got {tuple(t.shape)}")
    check_routing(hidden_states, E, top_k_index, top_k_weights, validate_ids)
    return check_float("alpha", alpha, 0.0, FLOAT32_MAX), check_float("limit", limit, 0.0, FLOAT32_MAX, low_open=True)


def gpt_oss_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor,
                    down_proj: torch.Tensor, down_proj_bias: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, alpha: float, limit: float, validate_ids: bool = True) -> torch.Tensor:
    """MoE experts with transformers' ``GptOssExperts.forward`` semantics, on our Triton kernels.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        gate_up_proj: [E, H, 2I] (``x @ w``), gate and up columns interleaved; gate_up_proj_bias [E, 2I].
        down_proj: [E, I, H]; down_proj_bias [E, H]. All in ``hidden_states``' dtype and device.
        top_k_index, top_k_weights, validate_ids: as ``fused_experts``.
        alpha, limit: the GLU's ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate <= limit and
            |up| <= limit (gpt-oss: 1.702 and 7.0).
    Returns:
        [T, H] in ``hidden_states``' dtype.
    """
    alpha, limit = check_gpt_oss_experts(hidden_states, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                         top_k_index, top_k_weights, alpha, limit, validate_ids)
    return _gpt_oss_experts_op(hidden_states, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, top_k_index,
                               top_k_weights, alpha, limit)


def launch_gpt_oss_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor,
                           down_proj: torch.Tensor, down_proj_bias: torch.Tensor, topk_ids: torch.Tensor,
                           topk_weights: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """``gpt_oss_experts`` on validated inputs (no host sync)."""
    return run_experts(hidden_states, *gpt_oss_weights(gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                                       alpha, limit), topk_ids, topk_weights)


_gpt_oss_experts_op = kernel_op(
    "gpt_oss_experts",
    "(Tensor hidden_states, Tensor gate_up_proj, Tensor gate_up_proj_bias, Tensor down_proj, Tensor down_proj_bias, "
    "Tensor top_k_index, Tensor top_k_weights, float alpha, float limit) -> Tensor",
    launch_gpt_oss_experts, fake=lambda x, *weights_and_routing: torch.empty_like(x),
    reference=gpt_oss_experts_reference)
