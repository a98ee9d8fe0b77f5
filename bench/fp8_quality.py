"""``python -m bench.fp8_quality``: what FP8 experts cost in quality, against the same model in bf16.

Two checks, on a GPU with FP8:

1. the harness's trained MoE (``python -m bench.train --models moe`` writes its checkpoint): held-out
   bits/byte with its experts in bf16, then with every ``FusedMoE`` converted (``quantize_fp8``), on
   the same held-out bytes; the target is a change within 0.5%;
2. a Qwen3-MoE from transformers (random init, bf16) patched with ``patch_hf_model``: the FP8
   model's logits against the bf16 patched model's (relative error, and how often the top-1 token
   agrees) on random tokens.

Without an FP8 GPU, or without the checkpoint, that part is null with the reason.
"""
import argparse
import sys
from pathlib import Path

import torch

import kernels
from bench._cli import add_preset_flags, checked_output_file, eval_bytes, resolve_preset, write_report
from bench.harness.corpus import corpus_files, evaluate, heldout_streams, split_by_file, stdlib_root
from bench.harness.measure import ModelSpec, load_weights
from bench.harness.models import TransformerLM
from bench.harness.presets import Preset
from calibration.results import provenance
from kernels.validate import gpu_has_fp8

MAX_BITS_PER_BYTE_CHANGE = 0.005  # issue 19: held-out bits/byte within 0.5% of bf16
HF_CONFIG = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_experts=32,
                 num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=128, vocab_size=8192)


def harness_quality(preset: Preset, checkpoint_dir: str, eval_bytes: int | None) -> dict:
    """Held-out bits/byte of the trained MoE of ``preset`` in bf16 and with FP8 experts."""
    spec = ModelSpec("moe", preset.moe_dims(), preset.num_layers)
    lm = TransformerLM(spec.dims, spec.num_layers, moe=True, use_kernels=True, device="cuda", dtype=torch.bfloat16)
    checkpoint = load_weights(lm, spec, Path(checkpoint_dir))
    if not checkpoint["loaded"]:
        return {"bf16_bits_per_byte": None, "fp8_bits_per_byte": None, "reason": checkpoint["reason"]}
    root = stdlib_root()
    _, heldout = split_by_file(corpus_files(root))
    streams = heldout_streams(root, heldout, eval_bytes or preset.eval_bytes)
    with torch.no_grad():
        bf16 = evaluate(lm.eval(), streams, preset.seq_length, torch.device("cuda"))
        layers = [m.quantize_fp8() for m in lm.modules() if isinstance(m, kernels.FusedMoE)]
        fp8 = evaluate(lm, streams, preset.seq_length, torch.device("cuda"))
    change = fp8["bits_per_byte"] / bf16["bits_per_byte"] - 1.0
    return {"preset": preset.name, "checkpoint": checkpoint, "moe_layers": len(layers), "bytes": bf16["bytes"],
            "bf16_bits_per_byte": bf16["bits_per_byte"], "fp8_bits_per_byte": fp8["bits_per_byte"],
            "relative_change": change, "target": f"|change| <= {MAX_BITS_PER_BYTE_CHANGE:.1%}",
            "target_met": abs(change) <= MAX_BITS_PER_BYTE_CHANGE}


def hf_logits(seed: int = 0, batch: int = 4, seq_len: int = 256) -> dict:
    """A random-init Qwen3-MoE patched in bf16 and in FP8: the FP8 logits against the bf16 ones."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**HF_CONFIG)
    model = transformers.Qwen3MoeForCausalLM(config).to("cuda", torch.bfloat16).eval()
    kernels.patch_hf_model(model)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), device="cuda")
    with torch.no_grad():
        bf16 = model(tokens).logits.float()
        for layer in (m for m in model.modules() if isinstance(m, kernels.FusedMoE)):
            layer.quantize_fp8()
        fp8 = model(tokens).logits.float()
    return {"config": HF_CONFIG, "tokens": batch * seq_len,
            "logits_rel_error": ((fp8 - bf16).norm() / bf16.norm()).item(),
            "top1_agreement": (fp8.argmax(-1) == bf16.argmax(-1)).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_quality", description=__doc__.split("\n\n")[0])
    add_preset_flags(parser)
    parser.add_argument("--checkpoint_dir", default="checkpoints", help="where bench.train wrote the checkpoints")
    parser.add_argument("--eval_bytes", type=eval_bytes, default=None, help="held-out bytes (preset's)")
    parser.add_argument("--output", default=None, help="write the results JSON (atomically) to this path")
    args = parser.parse_args(argv)
    preset = resolve_preset(parser, args)
    if args.output:
        args.output = checked_output_file(parser, args.output)
    if not gpu_has_fp8():
        print("nothing measured: FP8 experts need a CUDA GPU of compute capability >= 8.9")
        return 0
    report = {"provenance": provenance(), "harness": harness_quality(preset, args.checkpoint_dir, args.eval_bytes),
              "hf": hf_logits()}
    harness, hf = report["harness"], report["hf"]
    if harness["bf16_bits_per_byte"] is None:
        print(f"harness MoE: not measured ({harness['reason']})")
    else:
        print(f"harness MoE ({harness['preset']}, {harness['bytes']} held-out bytes): bf16 "
              f"{harness['bf16_bits_per_byte']:.4f} bits/byte, FP8 {harness['fp8_bits_per_byte']:.4f} "
              f"({harness['relative_change']:+.3%}; target {harness['target']}: "
              f"{'met' if harness['target_met'] else 'NOT met'})")
    print(f"HF Qwen3-MoE (random init): FP8 logits vs bf16 rel. error {hf['logits_rel_error']:.3e}, "
          f"top-1 agreement {hf['top1_agreement']:.3%}")
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
