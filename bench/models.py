"""The harness's byte-level transformer language models, built from our kernels.

``TransformerLM(dims, num_layers, moe=False)`` is a pre-norm decoder: per layer RMSNorm →
fused QKV projection → FlashAttention (causal) → output projection, then RMSNorm → SwiGLU FFN
(dense) or ``kernels.FusedMoE`` (router + fused experts); a final RMSNorm and the LM head over
the 256 byte values. Every op it runs is an op of the cost model (``costmodel.ops``; the embedding
gather and head transposes are costed as ``residual_add``, one [T, H] elementwise pass each), so
``cost_plan`` lists a forward as table ops and a prediction is their sum. ``use_kernels=False`` runs the torch references instead (CPU runs).
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.attention import flash_attention_reference
from kernels.fused_experts import fused_experts_reference
from kernels.matmul import matmul_reference
from kernels.swiglu import swiglu_ffn_reference


def _param(*shape, scale, generator, device, dtype):
    return nn.Parameter((torch.randn(*shape, generator=generator) * scale).to(device, dtype))


class _Ops:
    """The kernels or their torch references, chosen once per model."""

    def __init__(self, use_kernels):
        self.matmul = kernels.matmul if use_kernels else matmul_reference
        self.attention = kernels.flash_attention if use_kernels else flash_attention_reference
        self.swiglu_ffn = kernels.swiglu_ffn if use_kernels else swiglu_ffn_reference
        self.moe = nn.Module.__call__ if use_kernels else _reference_moe


def _reference_moe(layer, hidden_states):
    """``FusedMoE`` with the torch experts (the router is the layer's own)."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, weights, ids = layer.gate(flat)
    out = fused_experts_reference(flat, layer.experts.gate_up_proj, layer.experts.down_proj, ids, weights)
    return out.view_as(hidden_states)


class Block(nn.Module):
    def __init__(self, dims, moe, ops, init):
        super().__init__()
        H, I, E = dims.d_model, dims.d_ff, dims.num_experts
        self.dims, self.ops = dims, ops
        self.attn_norm = nn.Parameter(torch.ones(H, device=init["device"], dtype=init["dtype"]))
        self.ffn_norm = nn.Parameter(torch.ones(H, device=init["device"], dtype=init["dtype"]))
        self.qkv_proj = _param(3 * H, H, scale=H ** -0.5, **init)
        self.out_proj = _param(H, H, scale=H ** -0.5, **init)
        if moe:
            router = kernels.TopKRouter(_param(E, H, scale=H ** -0.5, **init), dims.top_k)
            self.moe = kernels.FusedMoE(router, _param(E, 2 * I, H, scale=H ** -0.5, **init),
                                        _param(E, H, I, scale=I ** -0.5, **init))
        else:
            self.gate_up_proj = _param(2 * I, H, scale=H ** -0.5, **init)
            self.down_proj = _param(H, I, scale=I ** -0.5, **init)

    def attention(self, x):  # x: [B, S, H]
        B, S, H = x.shape
        heads = self.dims.n_heads
        qkv = self.ops.matmul(F.rms_norm(x, (H,), self.attn_norm), self.qkv_proj)  # [B, S, 3H]
        q, k, v = qkv.view(B, S, 3, heads, H // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, S, D], strided
        o = self.ops.attention(q, k, v, causal=True)  # [B, heads, S, D]
        return self.ops.matmul(o.transpose(1, 2).reshape(B, S, H), self.out_proj)

    def ffn(self, x):  # x: [B, S, H]
        h = F.rms_norm(x, (x.shape[-1],), self.ffn_norm)
        if hasattr(self, "moe"):
            return self.ops.moe(self.moe, h)
        return self.ops.swiglu_ffn(h, self.gate_up_proj, self.down_proj)

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.ffn(x)


class TransformerLM(nn.Module):
    """Byte-level decoder LM. ``dims`` is a ``costmodel.ops.ModelDims`` (its ``seq_len`` is the
    longest context); ``moe`` swaps each dense FFN for a ``FusedMoE`` whose ``gate`` (the router)
    is replaceable."""

    def __init__(self, dims, num_layers, moe=False, use_kernels=True, device="cpu", dtype=torch.float32, seed=0):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        gen = torch.Generator().manual_seed(seed)
        init = {"generator": gen, "device": device, "dtype": dtype}
        self.dims, self.moe = dims, moe
        ops = _Ops(use_kernels)
        self.embed = _param(dims.vocab_size, dims.d_model, scale=1.0, **init)
        self.blocks = nn.ModuleList(Block(dims, moe, ops, init) for _ in range(num_layers))
        self.final_norm = nn.Parameter(torch.ones(dims.d_model, device=device, dtype=dtype))
        self.lm_head = _param(dims.vocab_size, dims.d_model, scale=dims.d_model ** -0.5, **init)
        self.ops = ops

    def forward(self, tokens):
        """tokens: [B, S] int64 byte values → logits [B, S, vocab_size]."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a [B, S] int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.dims.seq_len:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; the model's context is {self.dims.seq_len}")
        x = self.embed[tokens]
        for block in self.blocks:
            x = block(x)
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm)
        return self.ops.matmul(x, self.lm_head)

    def cost_plan(self, batch_size):
        """One forward over [batch_size, dims.seq_len] as (op, op batch size, calls) for the cost model."""
        tokens, layers = batch_size * self.dims.seq_len, len(self.blocks)
        ffn = [("moe_router", tokens, layers), ("fused_experts", tokens, layers)] if self.moe \
            else [("swiglu_ffn", tokens, layers)]
        # residual_add also stands for the other [T, H] passes: each layer's head transpose and the embedding gather
        return [("rms_norm", tokens, 2 * layers + 1), ("qkv_projection", tokens, layers),
                ("flash_attention", batch_size, layers), ("output_projection", tokens, layers),
                *ffn, ("residual_add", tokens, 3 * layers + 1), ("lm_head", tokens, 1)]
