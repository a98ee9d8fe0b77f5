"""``python -m bench.tune_moe``: measure fused-MoE block configs and write this GPU's config files.

For the Mixtral, Qwen3-30B-A3B and OLMoE expert shapes and a ladder of token counts, every
(row block, gate_up config, down config) candidate is timed kernel by kernel (median of
CUDA-event timings) after a correctness check; the fastest pair becomes an entry of
``kernels/configs/moe_gate_up/<GPU>.json`` and ``moe_down/<GPU>.json``, pinned to that shape's
E and I and bounded by slots per expert (T*K/E). ``--weights fp8`` tunes the FP8 experts' W8A8
GEMMs instead (``moe_gate_up_fp8`` / ``moe_down_fp8``: FP8 tokens and intermediate, larger K
blocks among the candidates). Prefill candidates include weight tiles read by TMA (``tma``) and a
persistent grid (``persistent``). Needs a CUDA device.
"""
import argparse
import json
import math
import sys

import torch

from bench import moe_cases
from bench._cli import comma_list
from bench.harness.tuning import kept_shapes, time_candidates, tuned_path, write_tuned
from kernels.expert_blocks import group_by_expert
from kernels.fp8_experts import fp8_weights, quantize_fp8_weights
from kernels.fused_experts import concatenated_weights, launch_expert_gemm
from kernels.quantize import dequantize_fp8, quantize_fp8

# (block_n, block_k, warps, stages, group_m[, flags]); TMA: weight tiles through tensor descriptors (on a
# persistent grid: the fastest at Mixtral's T=16384 in bench/results/tma_prefill_H100/)
TMA, TMA_PERSISTENT = {"tma": True}, {"tma": True, "persistent": True}
DECODE = [(32, 128, 4, 4, 1), (64, 128, 4, 4, 1), (64, 256, 4, 3, 1), (128, 128, 4, 3, 1), (32, 256, 4, 3, 1)]
MID = [(64, 64, 4, 4, 8), (128, 64, 4, 3, 8), (128, 64, 8, 3, 8), (64, 128, 4, 3, 8), (128, 64, 8, 3, 8, TMA)]
PREFILL = [(128, 64, 8, 3, 8), (128, 128, 8, 3, 8), (64, 128, 4, 4, 8), (128, 64, 8, 3, 8, TMA),
           (128, 64, 8, 4, 8, TMA), (128, 64, 8, 3, 8, TMA_PERSISTENT)]
# FP8 operands take half the bytes per K step: deeper K blocks for the same shared memory
# 16- and 32-column decode tiles: Qwen3's gate-up at one token runs 8 slots x 768 / 64 = 96 programs on 64
FP8_TILES = {"decode": [(64, 256, 4, 4, 1), (128, 256, 4, 3, 1), (64, 512, 4, 3, 1), (32, 512, 4, 3, 1),
                        (128, 128, 4, 4, 1), (32, 256, 4, 4, 1), (16, 512, 4, 3, 1)],
             "mid": [(64, 128, 4, 4, 8), (128, 128, 4, 3, 8), (128, 128, 8, 3, 8), (64, 256, 4, 3, 8)],
             "prefill": [(128, 128, 8, 3, 8), (128, 256, 8, 3, 8), (256, 128, 8, 3, 8), (128, 128, 4, 4, 8),
                         (128, 128, 8, 3, 8, TMA)]}
BF16_TILES = {"decode": DECODE, "mid": MID, "prefill": PREFILL}
TOKENS = {"mixtral": (1, 16, 128, 1024, 4096), "qwen3": (1, 16, 128, 1024, 8192), "olmoe": (1, 16, 128, 1024, 8192)}


def tiles_for(slots_per_expert: int, tiles: dict = BF16_TILES) -> list:
    """(block_m, tile candidates) to try for this many slots per expert (``tiles``: BF16_TILES or FP8_TILES)."""
    decode, mid, prefill = tiles["decode"], tiles["mid"], tiles["prefill"]
    if slots_per_expert <= 16:
        return [(16, decode)]
    if slots_per_expert <= 64:
        return [(16, decode), (32, mid), (64, mid)]
    if slots_per_expert <= 512:
        return [(64, mid), (128, prefill)]
    return [(128, prefill), (64, mid)]


def candidate_config(tile: tuple) -> dict:
    """A config entry from a candidate tile (block_n, block_k, warps, stages, group_m[, flags])."""
    bn, bk, warps, stages, group, *flags = tile
    return dict(block_n=bn, block_k=bk, group_m=group, num_warps=warps, num_stages=stages,
                **(flags[0] if flags else {}))


def slot_reference(a: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, gather_tokens: bool, fuse_swiglu: bool,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """What the expert GEMM writes for each slot, in fp32 torch (per-expert loop)."""
    flat = ids.reshape(-1).long()
    rows = torch.arange(flat.numel(), device=a.device)
    if gather_tokens:
        rows = rows // ids.shape[1]
    out = torch.empty((flat.numel(), w.shape[1] // (2 if fuse_swiglu else 1)), device=a.device)
    for expert in flat.unique().tolist():
        sel = (flat == expert).nonzero()[:, 0]
        r = a[rows[sel]].float() @ w[expert].float().T
        if fuse_swiglu:
            gate, up = r.chunk(2, dim=-1)
            r = torch.nn.functional.silu(gate) * up
        out[sel] = r if weights is None else r * weights.reshape(-1)[sel, None].float()
    return out


def _fp8_operands(x, gate_up, down):
    """W8A8's operands: (x, its row scales, gate_up view, down view) in FP8, and the dequantized
    x, gate_up and down the references multiply."""
    (q_x, s_x), (q_gu, s_gu), (q_down, s_down) = quantize_fp8(x), quantize_fp8_weights(gate_up), \
        quantize_fp8_weights(down)
    dequantized = tuple(dequantize_fp8(q, s) for q, s in ((q_x, s_x), (q_gu, s_gu), (q_down, s_down)))
    return (q_x, s_x, *fp8_weights(q_gu, s_gu, q_down, s_down)), dequantized


def tune_point(shape: moe_cases.MoeShape, T: int, dtype: torch.dtype, device: torch.device | str = "cuda",
               fp8: bool = False) -> tuple:
    """Best (total ms, block_m, gate_up cfg, down cfg) at T tokens, and every candidate's time (ms);
    with ``fp8``, of the W8A8 GEMMs."""
    x, gate_up, down, ids, weights = moe_cases.make_inputs(shape, T, device, dtype)
    n_slots = ids.numel()
    h = torch.empty((n_slots, shape.I), dtype=dtype, device=device)
    y = torch.empty((n_slots, shape.H), dtype=dtype, device=device)
    x_scale = h_scale = None
    if fp8:
        (x, x_scale, gate_up_view, down_view), (x_ref, gate_up, down) = _fp8_operands(x, gate_up, down)
    else:
        x_ref, (gate_up_view, down_view) = x, concatenated_weights(gate_up, down)
    h_ref = slot_reference(x_ref, gate_up, ids, True, True)
    h_in = h_ref.to(dtype)
    if fp8:
        h_in, h_scale = quantize_fp8(h_in)
    y_ref = slot_reference(dequantize_fp8(h_in, h_scale) if fp8 else h_in, down, ids, False, False, weights)
    flat_w = weights.reshape(-1)
    best, measured = None, []
    for block_m, tiles in tiles_for(n_slots // shape.E, FP8_TILES if fp8 else BF16_TILES):
        blocks = group_by_expert(ids, shape.E, block_m)

        def run_gate_up(cfg: dict) -> torch.Tensor:
            launch_expert_gemm(x, gate_up_view, h, blocks, None, shape.K, True, cfg, False, x_scale)
            return h

        def run_down(cfg: dict) -> torch.Tensor:
            launch_expert_gemm(h_in, down_view, y, blocks, flat_w, shape.K, False, cfg, False, h_scale)
            return y
        results = {"gate_up": time_candidates([candidate_config(t) for t in tiles], run_gate_up, lambda: h_ref),
                   "down": time_candidates([candidate_config(t) for t in tiles], run_down, lambda: y_ref)}
        for kernel, timed in results.items():
            measured.append({"shape": shape.name, "T": T, "block_m": block_m, "kernel": kernel,
                             "candidates": [{"config": c, "median_ms": ms, "error": e} for ms, e, c in timed]})
        fastest = [min((r for r in timed if r[0] is not None), key=lambda r: r[0], default=None)
                   for timed in results.values()]
        if None not in fastest and (best is None or fastest[0][0] + fastest[1][0] < best[0]):
            best = (fastest[0][0] + fastest[1][0], block_m, fastest[0][2], fastest[1][2])
    if best is None:
        raise RuntimeError(f"no candidate worked for {shape.name} at T={T}")
    return best, measured


def entries_for(shape: moe_cases.MoeShape, points: list, fp8: bool = False) -> tuple:
    """Config entries pinned to the shape's E and I, one per token count, bounded halfway (geometric)
    between neighbouring counts' slots per expert; the largest count's entry has no upper bound.
    FP8 entries choose W8A8 (the GEMMs tuned)."""
    gate_up, down = [], []
    spe = [T * shape.K / shape.E for T, _ in points]
    mode = {"quantize_activations": True} if fp8 else {}
    for n, (T, (_, block_m, cfg_gu, cfg_down)) in enumerate(points):
        when = {"min_e": shape.E, "max_e": shape.E, "min_i": shape.I, "max_i": shape.I}
        when |= {} if fp8 else {"max_elem_bytes": 2}
        if n + 1 < len(points):
            when["max_slots_per_expert"] = int(math.sqrt(max(spe[n], 0.5) * spe[n + 1]))
        gate_up.append({"when": when, "config": {"block_m": block_m} | cfg_gu | mode})
        down.append({"when": when, "config": cfg_down})
    return gate_up, down


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=comma_list(choices=TOKENS), default=",".join(TOKENS),
                        help="comma-separated subset of " + ",".join(TOKENS))
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                        help="tune the bf16 experts, or the FP8 experts' W8A8 GEMMs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA device; none was found")
    gpu = torch.cuda.get_device_name()
    fp8 = args.weights == "fp8"
    suffix = "_fp8" if fp8 else ""
    entries = {f"moe_gate_up{suffix}": [], f"moe_down{suffix}": []}
    measured = []
    for name in args.shapes:
        shape = moe_cases.SHAPES[name]
        points = []
        for T in TOKENS[name]:
            best, timed = tune_point(shape, T, torch.bfloat16, fp8=fp8)
            points.append((T, best))
            measured += timed
            print(f"{name} T={T}: {best[0]:.4f} ms block_m={best[1]} gate_up={best[2]} down={best[3]}", flush=True)
        gate_up, down = entries_for(shape, points, fp8)
        entries[f"moe_gate_up{suffix}"] += gate_up
        entries[f"moe_down{suffix}"] += down
    tuned_shapes = [moe_cases.SHAPES[name] for name in args.shapes]
    for op, op_entries in entries.items():
        path = tuned_path(op, gpu)
        earlier = json.loads(path.read_text()) if path.exists() else None
        kept_entries, kept_measured, kept = kept_shapes(earlier, tuned_shapes)
        write_tuned(op, gpu, op_entries + kept_entries, measured + kept_measured, "fp8 W8A8" if fp8 else "bf16", kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
