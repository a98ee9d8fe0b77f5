"""The harness's byte-level transformer language models, built from our kernels.

``TransformerLM(dims, num_layers, moe=False)`` is a pre-norm decoder: per layer RMSNorm →
fused QKV projection → FlashAttention (causal) → output projection, then RMSNorm → SwiGLU FFN
(dense) or ``kernels.FusedMoE`` (router + fused experts); a final RMSNorm and the LM head over
the 256 byte values. Every op it runs is an op of the cost model (``costmodel.ops``; the embedding
gather and head transposes are costed as ``residual_add``, one [T, H] elementwise pass each), so
``cost_plan`` lists a forward as table ops and a prediction is their sum. ``use_kernels=False``
runs the torch references instead (CPU runs).

Autoregressive decode keeps a static ``KVCache``: pre-allocated keys and values, and the filled
length as a device tensor. ``lm(prompt, cache)`` fills an empty cache (causal); each
``lm(next_tokens, cache)`` with one position per sequence writes its keys at the device-side
length and attends its single query to the cache through ``kernels.decode_attention``, which
reads that length on the device. No step reads a position on the host, so a decode step can be
captured once in a CUDA graph and replayed (``bench.harness.graphs``). There are no positional
embeddings (causal attention orders the bytes), so decode needs no position bookkeeping.
``decode_cost_plan`` lists a decode step's table ops; its attention (one query against the cache)
is not a table op (the table's ``flash_attention`` is a causal prefill over ``seq_len``), so it is
left out and named in ``DECODE_PLAN_EXCLUDES``.

Without our kernels (``use_kernels=False``: CPU runs and training) the experts run on
``torch._grouped_mm`` (``grouped_mm_experts``): one grouped GEMM per projection over the slots
sorted by expert, differentiable, never the per-expert Python loop.

``bench.harness.ttt_model.TTTLanguageModel`` adds test-time training to a dense
``TransformerLM``, and ``use_energy_aware_router`` swaps an MoE model's routers for ``router.EnergyAwareTTTRouter``.
"""

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.matmul import matmul_reference
from kernels.swiglu import swiglu_ffn_reference
from router.energy_router import EnergyAwareTTTRouter

DECODE_PLAN_EXCLUDES = ("decode attention (one query against the KV cache): not a table op",
                        "the KV-cache writes")


def model_dims(d_model: int, seq_length: int, num_experts: int = 4, top_k: int = 2,
               d_ff: int | None = None) -> ModelDims:
    """The harness's ``ModelDims`` for a width: d_ff (the dense FFN's, or each expert's) defaults to
    4 d_model; heads of 64 (of 32 when d_model is not a multiple of 64; the attention kernels take
    head dims 32/64/128). At d_model 256 these are the calibrated table's dims (4 heads, d_ff 1024)."""
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 32 or d_model % 32:
        raise ValueError(f"d_model must be a positive multiple of 32 (attention heads of 32 or 64), got {d_model!r}")
    head_dim = 64 if d_model % 64 == 0 else 32
    return ModelDims(d_model=d_model, d_ff=4 * d_model if d_ff is None else d_ff, n_heads=d_model // head_dim,
                     seq_len=seq_length, num_experts=num_experts, top_k=top_k)


def _param(*shape, scale, generator, device, dtype):
    return nn.Parameter((torch.randn(*shape, generator=generator) * scale).to(device, dtype))


class _Ops:
    """The kernels or their torch references, chosen once per model."""

    def __init__(self, use_kernels):
        self.matmul = kernels.matmul if use_kernels else matmul_reference
        self.attention = kernels.flash_attention if use_kernels else _sdpa
        self.decode_attention = decode_attention if use_kernels else decode_attention_reference
        self.swiglu_ffn = kernels.swiglu_ffn if use_kernels else swiglu_ffn_reference
        self.moe = nn.Module.__call__ if use_kernels else _grouped_mm_moe


def _sdpa(q, k, v, causal):
    """The attention kernel's semantics (SDPA's) on torch's own attention: the reference ops' path."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _grouped_mm_moe(layer, hidden_states):
    """``FusedMoE`` with the experts on ``torch._grouped_mm`` (the router is the layer's own)."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, weights, ids = layer.gate(flat)
    out = grouped_mm_experts(flat, layer.experts.gate_up_proj, layer.experts.down_proj, ids, weights)
    return out.view_as(hidden_states)


def grouped_mm_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                       topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The fused experts' function on ``torch._grouped_mm``, differentiable in every input but the ids.

    hidden_states [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], topk_ids/topk_weights [T, K]:
    the T*K slots sorted by expert, one grouped GEMM per projection (group e = expert e's slots),
    SwiGLU between, each slot's row scaled by its weight and added back to its token. On a GPU the
    GEMMs run in bf16 (the grouped GEMM's dtype there), fp32 on a CPU."""
    T, H = hidden_states.shape
    E, K = gate_up_proj.shape[0], topk_ids.shape[1]
    dtype = torch.bfloat16 if hidden_states.is_cuda else torch.float32
    slot_experts = topk_ids.reshape(-1).long()
    empty = slot_experts < 0  # id -1: an empty slot (kernels.policy_routing); it runs as expert 0 with weight 0
    slot_experts = slot_experts.clamp_min(0)
    order = torch.argsort(slot_experts, stable=True)  # [T*K] slots grouped by expert
    counts = torch.zeros(E, dtype=torch.int32, device=hidden_states.device).index_add_(
        0, slot_experts, torch.ones_like(slot_experts, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)  # group ends, as _grouped_mm wants them
    tokens = order // K
    x = hidden_states[tokens].to(dtype)  # [T*K, H]
    gate, up = torch._grouped_mm(x, gate_up_proj.to(dtype).transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.to(dtype).transpose(-2, -1), offs=offsets)  # [T*K, H]
    y = y.float() * topk_weights.reshape(-1).masked_fill(empty, 0.0)[order, None].float()
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden_states.device).index_add(0, tokens, y)
    return out.to(hidden_states.dtype)


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

    def attention(self, x: torch.Tensor, cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        # x: [B, S, H]
        B, S, H = x.shape
        heads = self.dims.n_heads
        qkv = self.ops.matmul(F.rms_norm(x, (H,), self.attn_norm), self.qkv_proj)  # [B, S, 3H]
        q, k, v = qkv.view(B, S, 3, heads, H // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, S, D], strided
        if cache is not None and cache.filled:  # one query per sequence against the cache (its past)
            cache.write_step(layer, k, v)
            o = self.ops.decode_attention(q, cache.keys[layer], cache.values[layer], cache.step_lengths)
        else:  # a prefill (filling an empty cache) is causal over its own positions
            if cache is not None:
                cache.write_prompt(layer, k, v)
            o = self.ops.attention(q, k, v, causal=True)  # [B, heads, S, D]
        return self.ops.matmul(o.transpose(1, 2).reshape(B, S, H), self.out_proj)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, H]
        h = F.rms_norm(x, (x.shape[-1],), self.ffn_norm)
        if hasattr(self, "moe"):
            return self.ops.moe(self.moe, h)
        return self.ops.swiglu_ffn(h, self.gate_up_proj, self.down_proj)

    def forward(self, x: torch.Tensor, cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(x, cache, layer)
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

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None) -> torch.Tensor:
        """tokens: [B, S] int64 byte values → logits [B, S, vocab_size]. With a ``KVCache``: an empty
        cache takes a prompt (any S), a filled one one position per sequence (S = 1, decode)."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a [B, S] int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.dims.seq_len:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; the model's context is {self.dims.seq_len}")
        if cache is not None:
            cache.begin(tokens.shape)
        x = self.embed[tokens]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.end(tokens.shape[1])
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm)
        return self.ops.matmul(x, self.lm_head)

    def new_cache(self, batch_size: int, capacity: int | None = None) -> "KVCache":
        """An empty ``KVCache`` for ``batch_size`` sequences of up to ``capacity`` (default: seq_len) positions."""
        return KVCache(len(self.blocks), batch_size, self.dims.n_heads, capacity or self.dims.seq_len,
                       self.dims.head_dim, self.embed.device, self.embed.dtype)

    def parameter_counts(self) -> dict:
        """Total parameters, and those one token uses (an MoE token runs top_k of num_experts experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not self.moe:
            return {"total": total, "active_per_token": total}
        experts = self.blocks[0].moe.experts
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // self.dims.num_experts
        idle = len(self.blocks) * (self.dims.num_experts - self.dims.top_k) * per_expert
        return {"total": total, "active_per_token": total - idle}

    def cost_plan(self, batch_size: int) -> list:
        """One forward over [batch_size, dims.seq_len] as (op, op batch size, calls) for the cost model."""
        ops = self._token_ops(batch_size * self.dims.seq_len)
        return ops[:2] + [("flash_attention", batch_size, len(self.blocks))] + ops[2:]

    def decode_cost_plan(self, batch_size: int) -> list:
        """One decode step of ``batch_size`` sequences (one token each) as table ops, without its
        attention (``DECODE_PLAN_EXCLUDES``): a partial prediction."""
        return self._token_ops(batch_size)

    def _token_ops(self, tokens):
        layers = len(self.blocks)
        ffn = [("moe_router", tokens, layers), ("fused_experts", tokens, layers)] if self.moe \
            else [("swiglu_ffn", tokens, layers)]
        # residual_add also stands for the other [T, H] passes: each layer's head transpose and the embedding gather
        return [("rms_norm", tokens, 2 * layers + 1), ("qkv_projection", tokens, layers),
                ("output_projection", tokens, layers), *ffn, ("residual_add", tokens, 3 * layers + 1),
                ("lm_head", tokens, 1)]


class KVCache:
    """Past keys and values of every layer, ``keys``/``values`` [layers, B, heads, capacity, D],
    allocated once. ``length`` ([1] int32, on the device) counts the filled positions of every
    sequence (they decode in step); a decode step writes at ``length`` and attends to
    ``length + 1`` positions without reading either on the host. ``rewind(n)`` sets the length back
    (on the device too), so a captured step can re-decode one position again and again. The host
    keeps ``filled`` (positions written by eager calls) only to refuse misuse before any work."""

    def __init__(self, num_layers, batch_size, n_heads, capacity, head_dim, device, dtype):
        shape = (num_layers, batch_size, n_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = torch.zeros(1, dtype=torch.int32, device=device)
        self.step_lengths = torch.ones(1, dtype=torch.int32, device=device)  # length + 1 during a step
        self._write_index = torch.zeros(1, dtype=torch.long, device=device)
        self.filled = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def begin(self, token_shape: tuple) -> None:
        """Check a call's [B, S] against the cache; a decode step computes its device-side indices."""
        B, S = token_shape
        if B != self.keys.shape[1]:
            raise ValueError(f"tokens has batch {B}; the cache holds {self.keys.shape[1]} sequences")
        if self.filled and S != 1:
            # the attention kernels' causal mask is top-left aligned: S queries after cached keys would be mis-masked
            raise ValueError(f"a filled cache takes one position per sequence (decode), got {S}")
        if self.filled + S > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self.filled} + {S} would overflow it")
        if self.filled:
            self._write_index.copy_(self.length)
            torch.add(self.length, 1, out=self.step_lengths)

    def end(self, positions: int) -> None:
        if self.filled:
            self.length.add_(positions)
        else:
            self.length.fill_(positions)
        self.filled += positions

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prefill's [B, heads, S, D] keys and values into positions [0, S)."""
        self.keys[layer, :, :, :k.shape[2]] = k
        self.values[layer, :, :, :v.shape[2]] = v

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A decode step's [B, heads, 1, D] keys and values at the device-side length."""
        self.keys[layer].index_copy_(2, self._write_index, k)
        self.values[layer].index_copy_(2, self._write_index, v)

    def clear(self) -> None:
        """Empty again, for a new prompt (the buffers stay: a captured step still reads them)."""
        self.length.zero_()
        self.filled = 0

    def rewind(self, positions: int) -> None:
        """Back to ``positions`` filled positions (a device fill: capturable in a CUDA graph)."""
        if isinstance(positions, bool) or not isinstance(positions, int) or not 1 <= positions <= self.filled:
            raise ValueError(f"positions must be an int in [1, {self.filled}] (the filled positions), "
                             f"got {positions!r}")
        self.length.fill_(positions)
        self.filled = positions


def use_energy_aware_router(lm: TransformerLM, cost_model: KernelCostModel, **router_kwargs) -> TransformerLM:
    """Replace every block's router of an MoE ``TransformerLM`` with an ``EnergyAwareTTTRouter``
    sharing its gate weight (``router_kwargs`` go to ``EnergyAwareTTTRouter.from_router``)."""
    if not lm.moe:
        raise ValueError("lm must be an MoE TransformerLM (moe=True)")
    for block in lm.blocks:
        block.moe.gate = EnergyAwareTTTRouter.from_router(block.moe.gate, cost_model, **router_kwargs)
    return lm
