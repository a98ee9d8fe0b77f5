"""``python -m bench.compile_decode``: ``torch.compile`` of a patched HF Qwen3-MoE decode step beside our own CUDA graph.

A transformers ``Qwen3MoeForCausalLM`` (random init) patched with ``kernels.patch_hf_model``
decodes one token per sequence from a prefilled ``StaticCache`` (``bench.harness.hf_policies.DecodeStep``)
four ways: eager calls, our CUDA graph of the step, ``torch.compile(step, fullgraph=True)``
(inductor) and the same with ``mode="reduce-overhead"`` (inductor's CUDA graphs). Every way's
logits are checked against eager; on a GPU each is timed (median of CUDA-event timings after
warm-up) in the same run, and the report gives compiled / graph. Target (issue 17): reduce-overhead
within 10% of our graph. On a CPU: the tiny shape in fp32, eager and compile with the ``aot_eager``
backend (tracing, fake tensors; no code generation; no CUDA graphs, so neither of the graph ways),
correctness only, times null.
Writes ``--output`` atomically and prints a table last.
"""
import argparse
import sys

import torch

from bench._cli import checked_output_file, comma_list, positive_int
from bench.harness import hf_policies
from bench.kernels import NO_GPU, median_ms, rel_error
from calibration.results import provenance, write_json_atomic

WAYS = ("eager", "graph", "compile", "compile_reduce_overhead")
TARGET_RATIO = 1.10  # reduce-overhead / our graph
GPU_DEFAULTS = {"shape": "qwen3_30b_a3b", "num_layers": 4, "context": 256, "dtype": torch.bfloat16}
CPU_DEFAULTS = {"shape": "tiny", "num_layers": 2, "context": 8, "dtype": torch.float32}


def compile_options(way: str, on_gpu: bool) -> dict | None:
    """``torch.compile`` keywords for a way (None: not compiled)."""
    if not way.startswith("compile"):
        return None
    if not on_gpu:
        return {"fullgraph": True, "backend": "aot_eager"}
    return {"fullgraph": True} | ({"mode": "reduce-overhead"} if way == "compile_reduce_overhead" else {})


def decode_ways(model: torch.nn.Module, batch_size: int, args: argparse.Namespace, on_gpu: bool,
                generator: torch.Generator) -> dict[str, dict]:
    """{way: {"rel_error_vs_eager", "ms" (median ms a step, or None)}} for one decode batch, every way
    over the same cache and ids."""
    config, device = model.config, next(model.parameters()).device
    cache = hf_policies.static_cache(config, batch_size, args.context + 1, device, args.dtype)
    hf_policies.prefill(model, cache, torch.randint(config.vocab_size, (batch_size, args.context),
                                                    generator=generator).to(device))
    id_pool = torch.randint(config.vocab_size, (1, batch_size, 1), generator=generator).to(device)
    rows, eager_logits = {}, None
    for way in WAYS:
        if way in ("graph", "compile_reduce_overhead") and not on_gpu:
            continue  # CUDA graphs
        torch._dynamo.reset()
        step = hf_policies.DecodeStep(model, cache, args.context, id_pool, graph=way == "graph",
                                      compile_options=compile_options(way, on_gpu))
        logits = step().float().clone()  # the first call compiles (or captured before)
        eager_logits = logits if eager_logits is None else eager_logits
        rows[way] = {"rel_error_vs_eager": rel_error(logits, eager_logits),
                     "ms": median_ms(step) if on_gpu else None}
    return rows


def summary(rows: dict[int, dict[str, dict]]) -> dict[int, dict]:
    """compile / graph ratios and the target verdict per batch (None without times)."""
    out = {}
    for batch_size, ways in rows.items():
        graph_ms = ways.get("graph", {}).get("ms")
        ratios = {way: ways[way]["ms"] / graph_ms for way in ways if graph_ms and ways[way]["ms"]}
        out[batch_size] = {"ratio_to_graph": ratios or None,
                           "target_met": None if not ratios else ratios["compile_reduce_overhead"] <= TARGET_RATIO}
    return out


def print_table(rows: dict[int, dict[str, dict]], verdicts: dict[int, dict]) -> None:
    print(f"{'B':>4} {'way':26} {'err vs eager':>12} {'ms':>9} {'x graph':>8}")
    for batch_size, ways in rows.items():
        ratios = verdicts[batch_size]["ratio_to_graph"] or {}
        for way, row in ways.items():
            ms = "—" if row["ms"] is None else f"{row['ms']:.4f}"
            ratio = f"{ratios[way]:.3f}" if way in ratios else "—"
            print(f"{batch_size:4d} {way:26} {row['rel_error_vs_eager']:12.2e} {ms:>9} {ratio:>8}")
        met = verdicts[batch_size]["target_met"]
        print(f"     reduce-overhead <= {TARGET_RATIO}x our graph: "
              + {True: "met", False: "NOT met", None: f"not timed ({NO_GPU})"}[met])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", type=comma_list(positive_int), default="1,16", help="decode batch sizes")
    parser.add_argument("--num_layers", type=positive_int, default=None, help="decoder layers (4 on a GPU, 2 on a CPU)")
    parser.add_argument("--context", type=positive_int, default=None, help="prefilled tokens (256 on a GPU, 8 on a CPU)")
    parser.add_argument("--output", default="compile_decode.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.output = checked_output_file(parser, args.output)
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    config = hf_policies.qwen3_config(args.shape, args.num_layers)
    model, patched = hf_policies.build_model(config, device, args.dtype, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rows = {batch_size: decode_ways(model, batch_size, args, on_gpu, generator) for batch_size in args.decode}
    verdicts = summary(rows)
    report = {"provenance": provenance(), "shape": args.shape, "shape_note": hf_policies.SHAPE_NOTES[args.shape],
              "num_layers": args.num_layers, "context": args.context, "dtype": str(args.dtype).removeprefix("torch."),
              "patched_blocks": patched, "target": f"reduce-overhead <= {TARGET_RATIO}x our CUDA-graph decode",
              "time_null_reason": None if on_gpu else NO_GPU,
              "decode": [{"batch_size": b, "ways": rows[b]} | verdicts[b] for b in rows]}
    write_json_atomic(args.output, report)
    print_table(rows, verdicts)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
