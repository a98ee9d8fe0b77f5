"""``python -m bench.tune_routing``: measure the routing kernels' launch configs and write this GPU's files.

The routing kernels (``kernels.routing.topk_routing``; ``kernels.policy_routing``, OEA's fill and
ours) are latency-bound at decode: one small program per block of tokens, whose cost is its
reductions over [tokens per program, experts] tiles. For each expert count (8 top-2, 64, 128
and 256 top-8) and a ladder of token counts, every (tokens per program, num_warps) candidate is
checked against the default config's output (ids exact, weights to 1e-6) and timed as CUDA-graph
replays (median); after each expert count the results so far are written; the fastest becomes the entry ``{"when": {"max_e": E, "max_t": T}}`` of
``kernels/configs/<op>/<GPU>.json`` (``--write``), with every candidate's time under ``tuned``.
The policy kernel's time is the slower of its two fills. ``--experts`` tunes a subset (runs over
the others can come later: ``--write`` keeps the file's entries for expert counts it did not
tune, each with its own run's provenance). Needs a CUDA device.
"""
import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing

from bench._cli import checked_output_file, comma_list, positive_int
from bench.harness.router_energy import cost_model_for
from bench.moe_cases import MoeShape
from bench.harness.tuning import tuned_path, write_tuned
from calibration.results import provenance, write_json_atomic
from kernels.policy_routing import FillCost, PolicyRouting, policy_routing
from kernels.routing import RoutingResult, row_block, topk_routing
from router import EnergyAwareTTTRouter

EXPERTS = ((8, 2), (64, 8), (128, 8), (256, 8))  # (E, K)
TOKENS = (1, 4, 16, 64, 256, 1024)
# (tokens per program, num_warps) ladders; the policy kernel's is coarser: it compiles slower, per fill
LADDERS = {"topk_routing": ((1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8)),
           "policy_routing": ((1, 4, 16, 64), (1, 2, 4))}
REPLAY_MS = 10  # do_bench_cudagraph replays this window 10 times: ~0.1 s per candidate


def candidates(op: str, T: int, E: int) -> list:
    """The distinct launch configs of ``op`` at T tokens and E experts (tokens per program as ``row_block`` caps them)."""
    blocks, warps = LADDERS[op]
    return [{"block_t": b, "num_warps": w} for b in sorted({row_block(T, E, b) for b in blocks}) for w in warps]


def default_config(T: int, E: int) -> dict:
    """What ``configs/<op>/default.json`` launches at this point."""
    return {"block_t": row_block(T, E, 64), "num_warps": 4}


def logits(T: int, E: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(T, E, generator=gen, device="cuda") * 2.0).to(torch.bfloat16)


def fill_cost(E: int, K: int, workdir: str | Path) -> FillCost:
    """The cost fill's inputs, from an energy-aware router at these dims (prior table: values do not matter)."""
    shape = MoeShape(f"tune_e{E}", E=E, K=K, H=256, I=512, renormalize=True)
    model = cost_model_for(shape, workdir, timed=False)
    router = EnergyAwareTTTRouter(shape.H, E, K, model, keep_top_k=max(1, K // 2), adapt=False, track_stats=False,
                                  device="cuda")
    return FillCost(router._curves, router._state(), router.bias_offsets, router._bias_knobs())


def calls(op: str, x: torch.Tensor, K: int, cost: FillCost | None) -> dict:
    """{variant: call(config)}: the op's outputs at a launch config (two fills for the policy kernel)."""
    if op == "topk_routing":
        return {"plain": lambda cfg: topk_routing(x, K, config=cfg)}
    keep = max(1, K // 2)
    return {"active": lambda cfg: policy_routing(x, K, fill="active", keep_top_k=keep, config=cfg),
            "cost": lambda cfg: policy_routing(x, K, fill="cost", keep_top_k=keep, cost=cost, config=cfg)}


def same_routing(a: RoutingResult | PolicyRouting, b: RoutingResult | PolicyRouting) -> bool:
    return torch.equal(a.topk_ids, b.topk_ids) and torch.allclose(a.topk_weights, b.topk_weights, atol=1e-6, rtol=0)


def time_point(op: str, T: int, E: int, K: int, cost: FillCost | None) -> list:
    """[{config, us (slowest variant) or None, error}] for every candidate at one point."""
    x = logits(T, E, seed=T * 1000 + E)
    variants = calls(op, x, K, cost)
    expected = {name: call(None) for name, call in variants.items()}
    rows = []
    for cfg in candidates(op, T, E):
        try:
            for name, call in variants.items():
                if not same_routing(call(cfg), expected[name]):
                    raise AssertionError(f"{name}: routing differs from the default config's")
            us = max(triton.testing.do_bench_cudagraph(lambda: call(cfg), rep=REPLAY_MS, return_mode="median") * 1e3
                     for call in variants.values())
            rows.append({"config": cfg, "us": us, "error": None})
        except Exception as exc:  # a config that fails to compile or disagrees is skipped, with the reason
            rows.append({"config": cfg, "us": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def tune(op: str, experts: list, workdir: str | Path, save: Callable[[list, list], None]) -> tuple:
    """(config entries, measured points) for ``op`` over ``experts`` ((E, K) pairs) x ``TOKENS``;
    ``save(entries, measured)`` after each expert count, so a run cut short keeps what it measured."""
    entries, measured = [], []
    for E, K in experts:
        cost = fill_cost(E, K, workdir) if op == "policy_routing" else None
        best = None
        for T in TOKENS:
            rows = time_point(op, T, E, K, cost)
            timed = [r for r in rows if r["us"] is not None]
            best = min(timed, key=lambda r: r["us"])
            default_us = next(r["us"] for r in rows if r["config"] == default_config(T, E))
            entries.append({"when": {"max_e": E, "max_t": T}, "config": best["config"]})
            measured.append({"E": E, "K": K, "T": T, "best": best, "default_us": default_us, "candidates": rows})
            print(f"[tune_routing] {op} E={E} T={T}: {best['config']} {best['us']:.2f} us (default "
                  f"{default_us:.2f} us)", file=sys.stderr, flush=True)
        entries.append({"when": {"max_e": E}, "config": best["config"]})  # beyond the ladder: its last point's
        save(entries, measured)
    return entries, measured


def summary(point: dict) -> dict:
    """A measured point without its candidates (those stay in ``--output``), for the config file."""
    return {key: value for key, value in point.items() if key != "candidates"}


def merged_with_file(path: Path, entries: list, buckets: list, tuned_experts: set) -> tuple:
    """This run's entries and buckets, plus those of ``path`` (this GPU's file, if any) for the
    expert counts this run did not tune, each old bucket keeping its own run's provenance;
    entries ordered by expert count, then tokens (the first match wins)."""
    old = json.loads(path.read_text()) if path.exists() else {"entries": [], "tuned": {"buckets": []}}
    old_provenance = old.get("tuned", {}).get("provenance")
    kept = [e for e in old["entries"] if "max_e" in e.get("when", {}) and e["when"]["max_e"] not in tuned_experts]
    kept_buckets = [{"provenance": old_provenance} | b for b in old.get("tuned", {}).get("buckets", [])
                    if b["E"] not in tuned_experts]
    order = sorted(kept + entries, key=lambda e: (e["when"]["max_e"], e["when"].get("max_t", math.inf)))
    return order, sorted(kept_buckets + buckets, key=lambda b: (b["E"], b["T"]))


def table_lines(op: str, measured: list) -> list:
    lines = [f"{op}: best launch config per point (us per call, graph replays; default: 64 tokens, 4 warps)",
             f"{'E':>4} {'T':>5} {'block_t':>8} {'warps':>6} {'best_us':>8} {'default_us':>11}"]
    for m in measured:
        cfg = m["best"]["config"]
        lines.append(f"{m['E']:>4} {m['T']:>5} {cfg['block_t']:>8} {cfg['num_warps']:>6} {m['best']['us']:>8.2f} "
                     f"{m['default_us']:>11.2f}")
    return lines


def parse_args(argv: list | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="topk_routing,policy_routing")
    parser.add_argument("--experts", type=comma_list(positive_int), default=",".join(str(e) for e, _ in EXPERTS),
                        help="expert counts to tune (of 8, 64, 128, 256); --write keeps the file's others")
    parser.add_argument("--write", action="store_true", help="write kernels/configs/<op>/<GPU>.json")
    parser.add_argument("--output", default="tune_routing.json", help="every candidate's time (JSON)")
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    unknown = set(args.ops) - {"topk_routing", "policy_routing"}
    if unknown:
        parser.error(f"--ops: unknown {sorted(unknown)}; choose from topk_routing, policy_routing")
    unknown_e = set(args.experts) - {e for e, _ in EXPERTS}
    if unknown_e:
        parser.error(f"--experts: {sorted(unknown_e)} not tuned here; choose from {[e for e, _ in EXPERTS]}")
    args.experts = [(e, k) for e, k in EXPERTS if e in args.experts]
    args.output = checked_output_file(parser, args.output)
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.tune_routing times CUDA kernels: no CUDA device here", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    report = {"provenance": provenance(), "gpu": gpu, "method": f"CUDA-graph replays, median over {REPLAY_MS} ms",
              "ops": {}}
    lines = []
    with tempfile.TemporaryDirectory() as workdir:
        for op in args.ops:
            def save(entries: list, measured: list, op: str = op) -> None:
                report["ops"][op] = {"entries": entries, "measured": measured}
                write_json_atomic(Path(args.output), report)
                if args.write:
                    buckets = [summary(m) | {"provenance": report["provenance"]} for m in measured]
                    write_tuned(op, gpu, *merged_with_file(tuned_path(op, gpu), entries, buckets,
                                                           {e for e, _ in args.experts}), "bfloat16 logits")
            lines += table_lines(op, tune(op, args.experts, workdir, save)[1])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
