"""``python -m bench.tune_moe``: measure fused-MoE block configs and write this GPU's config files.

For the Mixtral, Qwen3-30B-A3B and OLMoE expert shapes and a ladder of token counts, every
(row block, gate_up config, down config) candidate is timed kernel by kernel (median of
CUDA-event timings) after a correctness check; the fastest pair becomes an entry of
``kernels/configs/moe_gate_up/<GPU>.json`` and ``moe_down/<GPU>.json``, pinned to that shape's
E and I and bounded by slots per expert (T*K/E). Needs a CUDA device.
"""
import argparse
import math
import sys

import torch

from bench import moe_cases
from bench._cli import comma_list
from bench.tune_kernels import time_candidates, write_tuned
from kernels.fused_experts import concatenated_weights, launch_expert_gemm
from kernels.routing import group_by_expert

DECODE = [(32, 128, 4, 4, 1), (64, 128, 4, 4, 1), (64, 256, 4, 3, 1), (128, 128, 4, 3, 1), (32, 256, 4, 3, 1)]
MID = [(64, 64, 4, 4, 8), (128, 64, 4, 3, 8), (128, 64, 8, 3, 8), (64, 128, 4, 3, 8)]
PREFILL = [(128, 64, 8, 3, 8), (128, 128, 8, 3, 8), (64, 128, 4, 4, 8)]
TOKENS = {"mixtral": (1, 16, 128, 1024, 4096), "qwen3": (1, 16, 128, 1024, 8192), "olmoe": (1, 16, 128, 1024, 8192)}


def tiles_for(slots_per_expert: int) -> list:
    """(block_m, tile candidates) to try for this many slots per expert."""
    if slots_per_expert <= 16:
        return [(16, DECODE)]
    if slots_per_expert <= 64:
        return [(16, DECODE), (32, MID), (64, MID)]
    if slots_per_expert <= 512:
        return [(64, MID), (128, PREFILL)]
    return [(128, PREFILL), (64, MID)]


def _cfg(tile):
    bn, bk, warps, stages, group = tile
    return dict(block_n=bn, block_k=bk, group_m=group, num_warps=warps, num_stages=stages)


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


def tune_point(shape: moe_cases.MoeShape, T: int, dtype: torch.dtype, device: torch.device | str = "cuda") -> tuple:
    """Best (total ms, block_m, gate_up cfg, down cfg) at T tokens, and every candidate's time (ms)."""
    x, gate_up, down, ids, weights = moe_cases.make_inputs(shape, T, device, dtype)
    n_slots = ids.numel()
    h = torch.empty((n_slots, shape.I), dtype=dtype, device=device)
    y = torch.empty((n_slots, shape.H), dtype=dtype, device=device)
    h_ref = slot_reference(x, gate_up, ids, True, True)
    h_in = h_ref.to(dtype)
    y_ref = slot_reference(h_in, down, ids, False, False, weights)
    flat_w = weights.reshape(-1)
    gate_up_view, down_view = concatenated_weights(gate_up, down)
    best, measured = None, []
    for block_m, tiles in tiles_for(n_slots // shape.E):
        blocks = group_by_expert(ids, shape.E, block_m)

        def run_gate_up(cfg: dict) -> torch.Tensor:
            launch_expert_gemm(x, gate_up_view, h, blocks, None, shape.K, True, cfg, False)
            return h

        def run_down(cfg: dict) -> torch.Tensor:
            launch_expert_gemm(h_in, down_view, y, blocks, flat_w, shape.K, False, cfg, False)
            return y
        results = {"gate_up": time_candidates([_cfg(t) for t in tiles], run_gate_up, lambda: h_ref),
                   "down": time_candidates([_cfg(t) for t in tiles], run_down, lambda: y_ref)}
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


def entries_for(shape: moe_cases.MoeShape, points: list) -> tuple:
    """Config entries pinned to the shape's E and I, one per token count, bounded halfway (geometric)
    between neighbouring counts' slots per expert; the largest count's entry has no upper bound."""
    gate_up, down = [], []
    spe = [T * shape.K / shape.E for T, _ in points]
    for n, (T, (_, block_m, cfg_gu, cfg_down)) in enumerate(points):
        when = {"min_e": shape.E, "max_e": shape.E, "min_i": shape.I, "max_i": shape.I, "max_elem_bytes": 2}
        if n + 1 < len(points):
            when["max_slots_per_expert"] = int(math.sqrt(max(spe[n], 0.5) * spe[n + 1]))
        gate_up.append({"when": when, "config": {"block_m": block_m} | cfg_gu})
        down.append({"when": when, "config": cfg_down})
    return gate_up, down


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=comma_list(choices=TOKENS), default=",".join(TOKENS),
                        help="comma-separated subset of " + ",".join(TOKENS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA device; none was found")
    gpu = torch.cuda.get_device_name()
    entries = {"moe_gate_up": [], "moe_down": []}
    measured = []
    for name in args.shapes:
        shape = moe_cases.SHAPES[name]
        points = []
        for T in TOKENS[name]:
            best, timed = tune_point(shape, T, torch.bfloat16)
            points.append((T, best))
            measured += timed
            print(f"{name} T={T}: {best[0]:.4f} ms block_m={best[1]} gate_up={best[2]} down={best[3]}", flush=True)
        gate_up, down = entries_for(shape, points)
        entries["moe_gate_up"] += gate_up
        entries["moe_down"] += down
    for op, op_entries in entries.items():
        write_tuned(op, gpu, op_entries, measured, "bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
