"""What our kernels do at a shape: the launches of one op call, each with its tiles and work.

The cost model's shape-general part (``costmodel.fit``) predicts from these, so it has to know
how each kernel splits its work: the block config it would pick (the table's ``kernel_configs``
section: the config entries the calibrated kernels read, copied by the sweep), the output tiles
that config makes, and the tensor-core FLOPs a tile runs *including padding* (a 96-row batch on
64-row tiles computes 128 rows). Waves over the SMs come from ``tiles`` and the table's
``sm_count`` (``costmodel.fit.launch_times``).

A ``Launch`` is one kernel launch; ``op_launches(op, batch_size, dims, configs)`` lists an op's.
Tiles are counted at the expected routing for ``fused_experts``: each expert's share of the
``batch_size * top_k`` slots is binomial under uniform routing, and its padded run fills
``ceil(slots / block_m)`` row blocks (``expected_row_blocks``).
"""
import functools
import math
from dataclasses import dataclass, replace

from costmodel.ops import (BYTES_PER_ELEMENT, FP8_BYTES, SCALE_BYTES, SEQUENCE_OPS, ModelDims, check_op,
                           expected_experts, work)

# the tile a table without kernel configs assumes (a prior, or a table older than the section)
GENERIC_CONFIG = {"block_m": 128, "block_n": 128, "block_k": 64}
ELEMENTWISE_BLOCK = 1024  # elements per program of torch's elementwise and norm kernels (rms_norm, residual_add)
# rows of torch's rms_norm one SM reduces at once: each row's loop is a serial, latency-bound stream
# (a single token's time grows with d_model), while thousands of rows share the SMs; of 1, 4, 8 and 16
# rows, 8 fitted the measured H100 table best (the README gives the figures)
NORM_ROWS_PER_SM = 8
CONFIG_OPS = ("matmul", "swiglu_gate_up", "moe_gate_up", "moe_down", "moe_gate_up_fp8", "moe_down_fp8", "attention",
              "topk_routing")
# kernels.quantize.ROWS_PER_PROGRAM and ONE_PASS_MAX_K (the cost model never imports the kernels)
QUANTIZE_ROWS_PER_PROGRAM = 4
QUANTIZE_ONE_PASS_MAX_K = 8192


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``tiles`` programs of ``tile_flops`` (padded) FLOPs each, moving at least
    ``nbytes`` through HBM; one program loads and stores ``tile_bytes`` (default: an even share);
    ``resident`` programs run on one SM at once (1 for our GEMM tiles, which fill its shared memory).
    ``routed``: ``tiles`` is an expectation over the routing (the fused experts' row blocks), so its
    waves are too: fractional, not whole (``costmodel.fit.launch_times``)."""
    tiles: float
    tile_flops: float
    nbytes: float
    tile_bytes: float = None
    resident: int = 1
    routed: bool = False

    def __post_init__(self):
        if self.tile_bytes is None:
            object.__setattr__(self, "tile_bytes", self.nbytes / max(self.tiles, 1))


def _holds(bound_key, bound, shape):
    kind, _, dim = bound_key.partition("_")
    value = shape.get(dim)
    return value is None or (value <= bound if kind == "max" else value >= bound)


def pick_config(configs: "dict | None", config_op: str, **shape: float) -> dict:
    """The block config our kernel picks for ``shape`` (the first entry whose ``when`` bounds hold,
    as ``kernels.config.select_config`` reads the same entries); ``GENERIC_CONFIG`` without entries."""
    for entry in (configs or {}).get(config_op, {}).get("entries", ()):
        if all(_holds(key, bound, shape) for key, bound in entry.get("when", {}).items()):
            return entry["config"]
    return GENERIC_CONFIG


def gemm(configs: "dict | None", config_op: str, M: float, N: int, K: int, gated: bool = False) -> Launch:
    """[M, K] x [K, N] (and a second [K, N] for a gated product) on the config's output tiles."""
    cfg = pick_config(configs, config_op, m=M, n=N, k=K, elem_bytes=BYTES_PER_ELEMENT)
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg.get("block_k", GENERIC_CONFIG["block_k"])
    products = 2 if gated else 1
    tiles = math.ceil(M / bm) * math.ceil(N / bn)
    k_padded = math.ceil(K / bk) * bk
    tile_flops = 2.0 * bm * bn * k_padded * products
    nbytes = BYTES_PER_ELEMENT * (M * K + products * N * K + M * N)
    return Launch(tiles, tile_flops, nbytes, _gemm_tile_bytes(bm, bn, k_padded, products))


def _gemm_tile_bytes(bm, bn, k_padded, products, operand_bytes=BYTES_PER_ELEMENT):
    """One output tile's loads (its rows of A, its columns of each B, all of K) and its (16-bit) store."""
    return operand_bytes * (bm + products * bn) * k_padded + BYTES_PER_ELEMENT * bm * bn


# FP8 tensor cores run twice the bf16 rate on Hopper and Ada (datasheets: H100 SXM 1979 against 989 dense
# TFLOP/s); the sweep measures the bf16 matmul ceiling only, so an FP8 tile counts half its FLOPs against it.
# With FP8 FLOPs counted whole, the H100 table's FP8 fits sat at the ceiling (compute_eff 1.0) and missed
# their own points by 18% RMS (expert_ffn_fp8; 9.5% with this), 20-44% over at 4096 tokens
FP8_MATMUL_SPEEDUP = 2.0


def _fused_experts(configs, B, dims, fp8=False):
    """The gate-up and down launches; both run on the gate-up config's row blocks (each expert's
    rows padded to a multiple of its ``block_m``). ``fp8``: the FP8 experts' W8A8 GEMMs (FP8
    operands, their own configs), each after the quantization of its input rows."""
    H, I, E, K = dims.d_model, dims.d_ff, dims.num_experts, dims.top_k
    slots = B * K
    touched = expected_experts(B, E, K)
    suffix, operand_bytes = ("_fp8", FP8_BYTES) if fp8 else ("", BYTES_PER_ELEMENT)
    shape = {"slots_per_expert": slots // E, "e": E, "i": I, "elem_bytes": BYTES_PER_ELEMENT}
    bm = pick_config(configs, "moe_gate_up" + suffix, **shape)["block_m"]
    row_blocks = expected_row_blocks(B, E, K, bm)
    launches = []
    for config_op, N, K_in, gated, rows_in in (("moe_gate_up", I, H, True, B), ("moe_down", H, I, False, slots)):
        if fp8:  # the input rows' quantization: the tokens, then each slot's intermediate
            launches.append(_quantize(rows_in, K_in))
        cfg = pick_config(configs, config_op + suffix, **shape)
        bn, bk = cfg["block_n"], cfg.get("block_k", GENERIC_CONFIG["block_k"])
        products, k_padded = 2 if gated else 1, math.ceil(K_in / bk) * bk
        tile_flops = 2.0 * bm * bn * k_padded * products / (FP8_MATMUL_SPEEDUP if fp8 else 1.0)
        nbytes = operand_bytes * (touched * products * N * K_in + slots * K_in) + BYTES_PER_ELEMENT * slots * N
        launches.append(Launch(row_blocks * math.ceil(N / bn), tile_flops, nbytes,
                               _gemm_tile_bytes(bm, bn, k_padded, products, operand_bytes), routed=True))
    return launches


@functools.lru_cache(maxsize=4096)  # fits and curves ask for the same points many times
def expected_row_blocks(batch_size: float, num_experts: int, top_k: int, block_m: int) -> float:
    """Row blocks the experts' padded runs fill when each of ``batch_size`` tokens picks ``top_k`` of
    ``num_experts`` uniformly: E * E[ceil(X / block_m)], X ~ Binomial(B, K/E) an expert's slots. Uneven
    loads fill more blocks than an even spread (96 slots an expert on 64-row blocks: 2 if even, and
    a third for experts past 128); the sum runs over X within 10 standard deviations of its mean."""
    B = max(int(round(batch_size)), 0)
    p = min(top_k / num_experts, 1.0)
    if B == 0 or p == 0.0:
        return 0.0
    if p == 1.0:
        return num_experts * math.ceil(B / block_m)
    mean, sd = B * p, math.sqrt(B * p * (1.0 - p))
    low, high = max(1, int(mean - 10 * sd)), min(B, int(mean + 10 * sd) + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    blocks = 0.0
    for x in range(low, high + 1):  # P(X = x) ceil(x / block_m)
        log_pmf = math.lgamma(B + 1) - math.lgamma(x + 1) - math.lgamma(B - x + 1) + x * log_p + (B - x) * log_q
        blocks += math.exp(log_pmf) * math.ceil(x / block_m)
    return num_experts * blocks


def _next_power_of_2(n):
    return 1 << (max(math.ceil(n), 1) - 1).bit_length()


def _quantize(rows, width):
    """``kernels.quantize`` (``quantize_plan``): a few rows per program, a row of up to
    ``QUANTIZE_ONE_PASS_MAX_K`` read once, whole, and fewer rows a program the longer it is; longer
    rows read twice (the second time from L2), four a program."""
    per_program, width_block = QUANTIZE_ROWS_PER_PROGRAM, _next_power_of_2(width)
    if width_block <= QUANTIZE_ONE_PASS_MAX_K:
        per_program = max(1, min(QUANTIZE_ROWS_PER_PROGRAM, _next_power_of_2(rows),
                                 QUANTIZE_ONE_PASS_MAX_K // width_block))
    tiles = math.ceil(rows / per_program)
    nbytes = (BYTES_PER_ELEMENT + FP8_BYTES) * rows * width + SCALE_BYTES * rows
    return Launch(tiles, 3.0 * rows * width / max(tiles, 1), nbytes)


def _attention(op, configs, B, dims):
    S, D, heads = dims.seq_len, dims.head_dim, dims.n_heads
    cfg = pick_config(configs, "attention", head_dim=D, elem_bytes=BYTES_PER_ELEMENT)
    bm, bn = cfg["block_m"], cfg["block_n"]
    _, nbytes = work(op, B, dims)
    rows = math.ceil(S / bm) * B * heads
    b = BYTES_PER_ELEMENT
    if op == "attention_qk":  # a [bm, D] query block against a [bn, D] key block, storing [bm, bn] scores
        return [Launch(rows * math.ceil(S / bn), 2.0 * bm * bn * D, nbytes, b * ((bm + bn) * D + bm * bn))]
    # causal: a row block sees (i + 1) column blocks of bn; on average half the sequence plus one block
    visible = min(S, (S + bm) / 2)
    if op == "flash_attention":  # scores and values: the query block, the visible keys and values, the output
        return [Launch(rows, 4.0 * bm * visible * D, nbytes, b * (2 * bm * D + 2 * visible * D))]
    # values alone: the visible scores, the visible values, the output block
    return [Launch(rows, 2.0 * bm * visible * D, nbytes, b * (bm * visible + visible * D + bm * D))]


def op_launches(op: str, batch_size: float, dims: ModelDims, configs: "dict | None" = None) -> list:
    """The launches of one call of ``op`` at ``batch_size`` (tokens; sequences for attention) and
    ``dims``, with the block configs in ``configs`` (a table's ``kernel_configs``)."""
    check_op(op)
    B, H, I = batch_size, dims.d_model, dims.d_ff
    if op in SEQUENCE_OPS:
        return _attention(op, configs, B, dims)
    if op in ("fused_experts", "fused_experts_fp8"):
        return _fused_experts(configs, B, dims, fp8=op == "fused_experts_fp8")
    if op == "expert_ffn_fp8":
        return _fused_experts(configs, B, replace(dims, num_experts=1, top_k=1), fp8=True)
    if op == "quantize_fp8":
        return [_quantize(B, H)]
    if op == "rms_norm":  # torch's kernel reduces one row per program
        flops, nbytes = work(op, B, dims)
        return [Launch(math.ceil(B), flops / math.ceil(B), nbytes, BYTES_PER_ELEMENT * 2 * H, NORM_ROWS_PER_SM)]
    if op in ("moe_router", "residual_add"):  # no tensor-core tiles: memory and launch bound
        flops, nbytes = work(op, B, dims)
        tiles = math.ceil(B * H / ELEMENTWISE_BLOCK)
        return [Launch(tiles, flops / tiles, nbytes)]
    gemms = {"ffn_gate": [("matmul", I, H, False)], "ffn_up": [("matmul", I, H, False)],
             "ffn_down": [("matmul", H, I, False)], "swiglu_gate_up": [("swiglu_gate_up", I, H, True)],
             "swiglu_ffn": [("swiglu_gate_up", I, H, True), ("matmul", H, I, False)],
             "qkv_projection": [("matmul", 3 * H, H, False)], "output_projection": [("matmul", H, H, False)],
             "lm_head": [("matmul", dims.vocab_size, H, False)]}[op]
    return [gemm(configs, config_op, B, N, K, gated) for config_op, N, K, gated in gemms]
