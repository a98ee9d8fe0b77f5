"""Fused MoE experts: a grouped GEMM over experts with the tokens gathered inside the kernel.

Semantics are exactly transformers 5.x ``MixtralExperts.forward(hidden_states, top_k_index,
top_k_weights)``: each token's output is the sum over its K chosen experts of
``weight * down(silu(gate(x)) * up(x))``. Two launches of one kernel do the work:

1. gate_up: rows gathered from ``hidden_states`` by token (no permuted copy), SiLU(gate)·up in
   the epilogue, written per slot to an [T*K, I] intermediate;
2. down: the intermediate's rows, times the top-k weight in the epilogue, written per slot;

then a fixed-order sum over each token's K slots (``kernels.gather_sum``; deterministic: no
atomics in the reduction), which skips slots whose expert id is outside [0, E).
Only blocks of experts that received tokens do work; with few tokens (decode) each touched
expert's weight tile is read once per output tile.

The kernel reads each projection through strides (``ExpertWeights``), so other layouts run on it
too (``kernels.gpt_oss_experts``, ``kernels.fp8_experts``).
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import config as _config
from kernels._library import kernel_op
from kernels.validate import (INDEX_DTYPES, check_bool, check_dim, check_same_device, check_same_dtype_device,
                               check_tensor, dot_precision, tma_compatible)
from kernels.dependent_launch import dependent_launch, wait_for_prior_kernel
from kernels.expert_blocks import DecodeSlots, ExpertBlocks, decode_slots_fit, group_by_expert
from kernels.gather_sum import launch_gather_sum
from kernels.matmul import processor_count
from kernels.quantize import launch_quantize_fp8
from kernels.routing import check_topk_ids
from kernels.tiles import cdiv, tile_coords, tile_products, tile_products_tma

PERSISTENT_PROGRAMS_PER_SM = 4  # persistent grids: enough resident programs to hide each one's loads


@triton.jit
def _glu(b_gate, b_up, CLAMPED: tl.constexpr, alpha, limit):
    """silu(gate) * up; CLAMPED: gpt-oss's (up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit
    (a NaN stays NaN, as torch.clamp keeps it: a poisoned token is not clamped into a finite output)."""
    if CLAMPED:
        b_gate = tl.minimum(b_gate, limit, propagate_nan=tl.PropagateNan.ALL)
        b_up = tl.clamp(b_up, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
        return (b_up + 1.0) * b_gate * tl.sigmoid(alpha * b_gate)
    return b_gate * tl.sigmoid(b_gate) * b_up


@triton.jit
def _expert_tile(
    i_e, b_slots, i_n, p_a, p_a_scale, p_w, d_w, p_w_scale, p_bias, p_out, p_topk_weights, N, K, n_slots,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, up_offset, up_rows, stride_se,
    scale_up_offset, stride_be, stride_bn, bias_up_offset, stride_om, stride_on, alpha, limit,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, GATHER_TOKENS: tl.constexpr, FUSE_GLU: tl.constexpr, CLAMPED_GLU: tl.constexpr,
    HAS_BIAS: tl.constexpr, MUL_WEIGHTS: tl.constexpr, A_SCALED: tl.constexpr, W_SCALED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr,
):
    """out[slot] = f(a[row(slot)] @ w[expert].T + bias[expert]) for the [BLOCK_M] slots ``b_slots``
    of expert ``i_e`` (``n_slots`` for a padding row), columns block ``i_n``.

    row(slot) is slot // TOP_K (its token) when GATHER_TOKENS, else slot. With FUSE_GLU, f is the
    gated activation (``_glu``) of the gate columns w[e, n] and the up columns ``up_offset``
    elements further on (their biases ``bias_up_offset`` on); with MUL_WEIGHTS, f scales by the slot's weight.
    FP8 operands carry scales that factor out of the K sum: W_SCALED multiplies column n by
    w_scale[e, n] (the up columns' ``scale_up_offset`` on), A_SCALED row r by a_scale[r]. With W_TMA
    the weight tiles come from the descriptor ``d_w`` ([E, rows, K]; up rows ``up_rows`` on) instead of ``p_w``."""
    i_e = i_e.to(tl.int64)
    m_rows = b_slots < n_slots  # padding rows carry the sentinel n_slots
    if GATHER_TOKENS:
        o_rows = tl.where(m_rows, b_slots // TOP_K, 0)
    else:
        o_rows = tl.where(m_rows, b_slots, 0)

    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    o_k = tl.arange(0, BLOCK_K)
    p_ab = p_a + o_rows.to(tl.int64)[:, None] * stride_am + o_k[None, :] * stride_ak  # [BM, BK]
    if W_TMA:  # gate rows past N read up rows (or zeros past the descriptor): their columns are never stored
        b_acc, b_acc_up = tile_products_tma(p_ab, d_w, i_e.to(tl.int32), i_n * BLOCK_N, up_rows, K, stride_ak,
                                            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, FUSE_GLU, DOT_PRECISION)  # [BM, BN] x2
    else:
        p_wb = p_w + i_e * stride_we + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk  # [BK, BN]
        b_acc, b_acc_up = tile_products(p_ab, p_wb, K, stride_ak, stride_wk, up_offset,
                                         BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, FUSE_GLU, DOT_PRECISION)  # [BM, BN] x2
    if W_SCALED:  # per-output-channel weight scales: [BN] of expert i_e
        p_sb = p_w_scale + i_e * stride_se + o_n
        b_acc *= tl.load(p_sb)[None, :]
        if FUSE_GLU:
            b_acc_up *= tl.load(p_sb + scale_up_offset)[None, :]
    if A_SCALED:  # per-row activation scales: [BM]
        b_a_scale = tl.load(p_a_scale + o_rows)[:, None]
        b_acc *= b_a_scale
        if FUSE_GLU:
            b_acc_up *= b_a_scale
    if HAS_BIAS:
        p_bb = p_bias + i_e * stride_be + o_n * stride_bn  # [BN]
        b_acc += tl.load(p_bb).to(tl.float32)[None, :]
        if FUSE_GLU:
            b_acc_up += tl.load(p_bb + bias_up_offset).to(tl.float32)[None, :]
    if FUSE_GLU:
        b_acc = _glu(b_acc, b_acc_up, CLAMPED_GLU, alpha, limit)
    if MUL_WEIGHTS:
        b_acc = b_acc * tl.load(p_topk_weights + b_slots, mask=m_rows, other=0.0).to(tl.float32)[:, None]

    o_on = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ob = p_out + b_slots.to(tl.int64)[:, None] * stride_om + o_on[None, :] * stride_on
    tl.store(p_ob, b_acc.to(p_out.dtype.element_ty), mask=m_rows[:, None] & (o_on[None, :] < N))


@triton.jit
def _block_run(i_m, p_sorted_slots, p_block_experts, BLOCK_M: tl.constexpr):
    """(expert, [BM] slots) of row block ``i_m`` of the ``ExpertBlocks`` layout."""
    return tl.load(p_block_experts + i_m), tl.load(p_sorted_slots + i_m * BLOCK_M + tl.arange(0, BLOCK_M))


@triton.jit
def _slot_run(i_slot, p_slot_experts, n_slots, n_experts, BLOCK_M: tl.constexpr):
    """The decode layout, built in registers from the flat ids [n_slots <= BM]: (the expert of slot
    ``i_slot``, [BM] that expert's slots in slot order (n_slots past them), whether ``i_slot`` leads
    them: its expert is in [0, n_experts) and no earlier slot has it)."""
    o_s = tl.arange(0, BLOCK_M)
    b_ids = tl.load(p_slot_experts + o_s, mask=o_s < n_slots, other=-1)  # [BM]
    i_e = tl.load(p_slot_experts + i_slot)
    b_same = b_ids == i_e
    leads = (tl.sum((b_same & (o_s < i_slot)).to(tl.int32), 0) == 0) & (i_e >= 0) & (i_e < n_experts)
    b_rank = tl.cumsum(b_same.to(tl.int32), 0) - 1  # row r of the run takes the expert's slot of rank r
    m_take = b_same[None, :] & (b_rank[None, :] == o_s[:, None])  # [BM rows, BM slots]
    b_slots = tl.where(tl.max(m_take.to(tl.int32), 1) > 0, tl.sum(tl.where(m_take, o_s[None, :], 0), 1), n_slots)
    return i_e, b_slots, leads


@triton.jit
def _expert_gemm_kernel(
    p_a, p_a_scale, p_w, d_w, p_w_scale, p_bias, p_out, p_sorted_slots, p_block_experts, p_num_padded,
    p_slot_experts, p_topk_weights, N, K, n_slots, n_experts, n_row_blocks,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, up_offset, up_rows, stride_se, scale_up_offset,
    stride_be, stride_bn, bias_up_offset, stride_om, stride_on, alpha, limit,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, GATHER_TOKENS: tl.constexpr, FUSE_GLU: tl.constexpr,
    CLAMPED_GLU: tl.constexpr, HAS_BIAS: tl.constexpr, MUL_WEIGHTS: tl.constexpr, A_SCALED: tl.constexpr,
    W_SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, W_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    DECODE_SLOTS: tl.constexpr, PDL: tl.constexpr,
):
    """The grouped GEMM over the ``ExpertBlocks`` layout: one tile per program, or with PERSISTENT
    a grid of a few programs per SM that loops over the routed tiles only (for inputs whose
    slots are mostly dropped, where the grid's bound n_row_blocks is far above the routed rows).
    DECODE_SLOTS: no layout; one program per (slot, column block) over the flat ids
    ``p_slot_experts``, where the slot leading its expert's slots computes them (``_slot_run``)."""
    wait_for_prior_kernel(PDL)
    if PERSISTENT:
        n_routed = tl.load(p_num_padded)  # rows of the experts' padded runs
        n_tiles = tl.cdiv(n_routed, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for i_tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            i_m, i_n = tile_coords(i_tile, n_routed, N, BLOCK_M, BLOCK_N, GROUP_M)
            i_e, b_slots = _block_run(i_m, p_sorted_slots, p_block_experts, BLOCK_M)
            _expert_tile(i_e, b_slots, i_n, p_a, p_a_scale, p_w, d_w, p_w_scale, p_bias, p_out, p_topk_weights,
                         N, K, n_slots, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                         up_offset, up_rows, stride_se, scale_up_offset, stride_be, stride_bn, bias_up_offset,
                         stride_om, stride_on, alpha, limit, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATHER_TOKENS,
                         FUSE_GLU, CLAMPED_GLU, HAS_BIAS, MUL_WEIGHTS, A_SCALED, W_SCALED, DOT_PRECISION, W_TMA)
    else:
        if DECODE_SLOTS:
            i_n = tl.program_id(0) // n_slots
            i_e, b_slots, active = _slot_run(tl.program_id(0) % n_slots, p_slot_experts, n_slots, n_experts, BLOCK_M)
        else:
            i_m, i_n = tile_coords(tl.program_id(0), n_row_blocks * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
            active = i_m * BLOCK_M < tl.load(p_num_padded)  # else rows past the last expert's padded run
        if active:
            if not DECODE_SLOTS:
                i_e, b_slots = _block_run(i_m, p_sorted_slots, p_block_experts, BLOCK_M)
            _expert_tile(i_e, b_slots, i_n, p_a, p_a_scale, p_w, d_w, p_w_scale, p_bias, p_out, p_topk_weights,
                         N, K, n_slots, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                         up_offset, up_rows, stride_se, scale_up_offset, stride_be, stride_bn, bias_up_offset,
                         stride_om, stride_on, alpha, limit, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, GATHER_TOKENS,
                         FUSE_GLU, CLAMPED_GLU, HAS_BIAS, MUL_WEIGHTS, A_SCALED, W_SCALED, DOT_PRECISION, W_TMA)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a microsecond more to build, twice a call
class ExpertWeights:
    """One projection's weights as the kernel reads them: ``w`` [E, N, K] (any strides: gate
    columns for a gated projection, whose up columns sit ``up_offset`` elements on), an optional
    ``bias`` [E, N] (up biases ``bias_up_offset`` on), and the gated activation (``glu``: None,
    "silu", or "clamped" with ``alpha`` and ``limit``). FP8 weights carry ``scale`` [E, N] float32
    with unit stride along N (the up columns' scales ``scale_up_offset`` on)."""
    w: torch.Tensor
    up_offset: int = 0
    scale: torch.Tensor | None = None
    scale_up_offset: int = 0
    bias: torch.Tensor | None = None
    bias_up_offset: int = 0
    glu: str | None = None
    alpha: float = 1.0
    limit: float = 0.0


def launch_expert_gemm(a: torch.Tensor, weights: ExpertWeights, out: torch.Tensor,
                       blocks: ExpertBlocks | DecodeSlots, topk_weights: torch.Tensor | None, top_k: int,
                       gather_tokens: bool, cfg: dict, persistent: bool, a_scale: torch.Tensor | None = None) -> None:
    """One expert GEMM over ``blocks`` (or a single token's ``DecodeSlots``); ``a_scale`` [rows of a]
    float32 scales FP8 activations ``a``. ``cfg`` may ask for weight tiles by TMA (``tma``) and a
    persistent grid (``persistent``, as the argument; not with ``DecodeSlots``)."""
    N, K = out.shape[1], a.shape[1]
    decode = isinstance(blocks, DecodeSlots)
    persistent = not decode and (persistent or bool(cfg.get("persistent")))
    w, bias, w_scale = weights.w, weights.bias, weights.scale
    n_row_blocks = blocks.n_slots if decode else blocks.block_experts.shape[0]
    n_tiles = n_row_blocks * cdiv(N, cfg["block_n"])
    grid = (min(n_tiles, PERSISTENT_PROGRAMS_PER_SM * processor_count(a.device)) if persistent else n_tiles,)
    d_w, up_rows = weight_descriptor(weights, cfg) if cfg.get("tma") else (None, 0)
    pdl = dependent_launch(a.device)
    layout = (None, None, None, blocks.slot_experts) if decode else \
        (blocks.sorted_slots, blocks.block_experts, blocks.num_padded, None)
    _expert_gemm_kernel[grid](
        a, a_scale, w, d_w, w_scale, bias, out, *layout, topk_weights, N, K, blocks.n_slots,
        blocks.num_experts if decode else 0, n_row_blocks,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), weights.up_offset, up_rows,
        w_scale.stride(0) if w_scale is not None else 0, weights.scale_up_offset,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0, weights.bias_up_offset,
        out.stride(0), out.stride(1), float(weights.alpha), float(weights.limit),
        TOP_K=top_k, BLOCK_M=blocks.block_m, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        GROUP_M=cfg["group_m"], EVEN_K=K % cfg["block_k"] == 0, GATHER_TOKENS=gather_tokens,
        FUSE_GLU=weights.glu is not None, CLAMPED_GLU=weights.glu == "clamped", HAS_BIAS=bias is not None,
        MUL_WEIGHTS=topk_weights is not None, A_SCALED=a_scale is not None, W_SCALED=w_scale is not None,
        DOT_PRECISION=dot_precision(a.dtype), W_TMA=d_w is not None, PERSISTENT=persistent, DECODE_SLOTS=decode,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )


def weight_descriptor(weights: ExpertWeights, cfg: dict) -> tuple[TensorDescriptor | None, int]:
    """(a [E, rows, K] tensor descriptor of ``weights.w`` in [1, block_n, block_k] tiles, the up rows'
    offset in rows), or (None, 0) where TMA cannot read the layout: K strided (gpt-oss's ``x @ w``),
    misaligned, or up columns off a row boundary. rows spans the gate and up rows of a gated projection."""
    w = weights.w
    E, N, K = w.shape
    up_rows, off_row = divmod(weights.up_offset, w.stride(1)) if weights.glu else (0, 0)
    if off_row or not tma_compatible(w):
        return None, 0
    return TensorDescriptor(w, [E, up_rows + N, K], list(w.stride()), [1, cfg["block_n"], cfg["block_k"]]), up_rows


def expert_configs(hidden_states: torch.Tensor, num_experts: int, intermediate: int, n_slots: int) -> tuple:
    """(gate_up config, down config) for this shape on this device, from the per-GPU JSON files."""
    return _config.lookup_each(("moe_gate_up", "moe_down"), hidden_states.device,
                               slots_per_expert=n_slots // num_experts, e=num_experts, i=intermediate,
                               elem_bytes=hidden_states.element_size())


def concatenated_weights(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> tuple:
    """The kernel's view of transformers' default layout: ``gate_up_proj`` [E, 2I, H] (I gate rows,
    then I up rows), ``down_proj`` [E, H, I]; SiLU."""
    I = gate_up_proj.shape[1] // 2
    return (ExpertWeights(gate_up_proj[:, :I], up_offset=I * gate_up_proj.stride(1), glu="silu"),
            ExpertWeights(down_proj))


def launch_fused_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                         topk_ids: torch.Tensor, topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None,
                         persistent: bool = False) -> torch.Tensor:
    """Run the fused experts (transformers' default layout) on validated inputs (no host sync);
    ``configs`` overrides the files.

    ``persistent`` runs the GEMMs on a few programs per SM that loop over the routed tiles: for
    ids mostly out of range (an expert-parallel rank's share), whose grid bound is mostly idle."""
    return run_experts(hidden_states, *concatenated_weights(gate_up_proj, down_proj), topk_ids, topk_weights,
                       configs, persistent)


def run_experts(hidden_states: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None,
                persistent: bool = False, quantize_activations: bool = False) -> torch.Tensor:
    """The two expert GEMMs and the sum over each token's slots, for ``ExpertWeights`` of any layout;
    ``quantize_activations`` feeds each GEMM its input rows in FP8 (``kernels.quantize``: W8A8)."""
    T, H = hidden_states.shape
    E, intermediate_size, _ = gate_up.w.shape
    top_k = topk_ids.shape[1]
    out = torch.empty((T, H), dtype=hidden_states.dtype, device=hidden_states.device)
    if T == 0 or H == 0:
        return out
    if intermediate_size == 0:  # validation refuses it where a down bias would make it non-zero
        return out.zero_()
    n_slots = T * top_k
    cfg_gate_up, cfg_down = configs or expert_configs(hidden_states, E, intermediate_size, n_slots)
    blocks = expert_layout(topk_ids, E, cfg_gate_up, persistent)
    intermediate = torch.empty((n_slots, intermediate_size), dtype=hidden_states.dtype, device=hidden_states.device)
    a, a_scale = launch_quantize_fp8(hidden_states) if quantize_activations else (hidden_states, None)
    launch_expert_gemm(a, gate_up, intermediate, blocks, None, top_k, True, cfg_gate_up, persistent, a_scale)
    per_slot = torch.empty((n_slots, H), dtype=hidden_states.dtype, device=hidden_states.device)
    weights = topk_weights.contiguous().view(-1)  # the kernel indexes it by slot with unit stride
    a, a_scale = launch_quantize_fp8(intermediate) if quantize_activations else (intermediate, None)
    launch_expert_gemm(a, down, per_slot, blocks, weights, top_k, False, cfg_down, persistent, a_scale)
    # fixed-order, deterministic sum over each token's slots; slots of out-of-range ids (dropped,
    # never written) are skipped: expert parallelism sends every rank ids outside its experts
    return launch_gather_sum(per_slot, topk_ids, out, num_experts=E)


def expert_layout(topk_ids: torch.Tensor, num_experts: int, cfg: dict,
                  persistent: bool) -> ExpertBlocks | DecodeSlots:
    """How the GEMMs find each expert's slots: for one token (not on a persistent grid, and unless
    the gate-up config says ``"decode_slots": false``) straight from the ids, else grouped by expert."""
    T, n_slots, block_m = topk_ids.shape[0], topk_ids.numel(), cfg["block_m"]
    if decode_slots_fit(T, n_slots, block_m) and not persistent and cfg.get("decode_slots", True):
        return DecodeSlots(topk_ids.contiguous().view(-1), num_experts, block_m, n_slots)  # unit stride
    return group_by_expert(topk_ids, num_experts, block_m)


def fused_experts_reference(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                            intermediate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The per-expert loop in torch, as transformers' eager ``MixtralExperts.forward`` computes it;
    ``intermediate`` maps each expert's silu(gate) * up before the down projection (the FP8
    reference's rounding)."""
    out = torch.zeros_like(hidden_states)
    for expert in range(gate_up_proj.shape[0]):
        token, k = torch.where(top_k_index == expert)  # may be empty: no branch on it, so compile can trace
        gate, up = (hidden_states[token] @ gate_up_proj[expert].T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        y = (h if intermediate is None else intermediate(h)) @ down_proj[expert].T
        out = out.index_add(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
    return out


def check_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  top_k_index: torch.Tensor, top_k_weights: torch.Tensor, validate_ids: bool = True) -> None:
    """Validate the ``fused_experts`` arguments; ``validate_ids`` range-checks ids (one device sync)."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3)
    check_tensor("down_proj", down_proj, ndim=3)
    check_same_dtype_device(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj)
    T, H = hidden_states.shape
    E, two_i, _ = gate_up_proj.shape
    check_dim("gate_up_proj", gate_up_proj, 2, H, "the hidden size of hidden_states")
    if E == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H] with E, I >= 1 (gate rows, then up rows), "
                         f"got shape {tuple(gate_up_proj.shape)}")
    check_dim("down_proj", down_proj, 0, E, "the experts of gate_up_proj")
    check_dim("down_proj", down_proj, 1, H, "the hidden size of hidden_states")
    check_dim("down_proj", down_proj, 2, two_i // 2, "half of dim 1 of gate_up_proj")
    check_routing(hidden_states, E, top_k_index, top_k_weights, validate_ids)


def check_routing(hidden_states: torch.Tensor, num_experts: int, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, validate_ids: bool) -> None:
    """The [T, K] ids and weights beside [T, H] hidden states (ids range-checked with ``validate_ids``)."""
    if check_bool("validate_ids", validate_ids):
        check_topk_ids("top_k_index", top_k_index, num_experts)
    else:
        check_tensor("top_k_index", top_k_index, ndim=2, dtypes=INDEX_DTYPES)
    check_dim("top_k_index", top_k_index, 0, hidden_states.shape[0], "the tokens of hidden_states")
    check_tensor("top_k_weights", top_k_weights, ndim=2)
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights has shape {tuple(top_k_weights.shape)}; expected {tuple(top_k_index.shape)} "
                         "(the shape of top_k_index)")
    check_same_device(hidden_states=hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights)


def fused_experts(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  top_k_index: torch.Tensor, top_k_weights: torch.Tensor, validate_ids: bool = True) -> torch.Tensor:
    """MoE experts with transformers 5.x ``MixtralExperts.forward`` semantics, on our Triton kernels.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        gate_up_proj: [E, 2I, H], gate rows first; same dtype and device.
        down_proj: [E, H, I].
        top_k_index: [T, K] int32/int64 expert ids, K <= E.
        top_k_weights: [T, K] float weights (any float dtype; used in fp32).
        validate_ids: range-check ``top_k_index`` on the host (one sync; pass False on hot paths
            whose ids come from a router: out-of-range ids are then dropped, contributing nothing).
    Returns:
        [T, H] in ``hidden_states``' dtype.
    """
    check_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, validate_ids)
    return _fused_experts_op(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)


_fused_experts_op = kernel_op(
    "fused_experts",
    "(Tensor hidden_states, Tensor gate_up_proj, Tensor down_proj, Tensor top_k_index, Tensor top_k_weights) -> Tensor",
    launch_fused_experts,
    fake=lambda x, gate_up, down, ids, weights: torch.empty_like(x), reference=fused_experts_reference)
