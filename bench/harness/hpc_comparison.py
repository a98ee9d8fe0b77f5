"""The HPC comparison's models (``python -m bench.hpc_single_gpu_test``): which models are compared,
the iso-quality dense baseline chosen by the checkpoints' held-out bits/byte, the cost table that
predicts each, and one device's run of them over the held-out corpus."""
import argparse

import torch

from bench.harness.corpus import corpus_files, heldout_streams, split_by_file, stdlib_root
from bench.harness.costs import select_cost_model
from bench.harness.measure import DeviceEnv, ModelSpec, checkpoint_bits_per_byte, run_device
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims


def model_specs(args: argparse.Namespace) -> tuple:
    """(specs, iso-quality selection): the compared models, with the iso-quality dense model chosen
    from the preset's ladder by the held-out bits/byte its checkpoints recorded."""
    p = args.preset
    dense, layers = p.dense_dims(), p.num_layers
    specs = [ModelSpec("transformer", dense, layers), ModelSpec("transformer_ttt", dense, layers)]
    if args.dense_only:
        return specs, {"chosen": None, "detail": "not chosen: --dense_only runs no MoE"}
    moe = p.moe_dims()
    specs += [ModelSpec("moe_energy_aware", moe, layers), ModelSpec("moe_topk", moe, layers)]
    selection = iso_quality_choice(args, moe)
    if selection["chosen"] not in (None, p.d_model):
        specs.append(ModelSpec("dense_iso", p.dense_dims(selection["chosen"]), layers))
    return specs, selection


def iso_quality_choice(args: argparse.Namespace, moe_dims: ModelDims) -> dict:
    p = args.preset
    target = checkpoint_bits_per_byte(ModelSpec("moe_topk", moe_dims, p.num_layers), args.checkpoint_dir)
    ladder = {w: checkpoint_bits_per_byte(ModelSpec("transformer", p.dense_dims(w), p.num_layers), args.checkpoint_dir)
              for w in p.dense_ladder}
    trained = {w: b for w, b in ladder.items() if b is not None}
    base = {"ladder_bits_per_byte": {str(w): b for w, b in ladder.items()}, "moe_bits_per_byte": target,
            "rule": "the smallest ladder width whose checkpoint's held-out bits/byte <= the MoE's (bench.train's "
                    "figures; the run re-measures each chosen model)"}
    if target is None or not trained:
        return base | {"chosen": None, "detail": "not chosen: quality not measured (no MoE or no dense checkpoint; "
                                                 "python -m bench.train)"}
    reaching = [w for w in sorted(trained) if trained[w] <= target]
    if reaching:
        chosen = reaching[0]
        return base | {"chosen": chosen, "reaches_moe_quality": True,
                       "detail": f"d_model {chosen} ({trained[chosen]:.3f} bits/byte vs the MoE's {target:.3f})"}
    chosen = min(trained, key=trained.get)
    return base | {"chosen": chosen, "reaches_moe_quality": False,
                   "detail": f"no trained ladder width reaches the MoE's {target:.3f} bits/byte; the closest, d_model "
                             f"{chosen} ({trained[chosen]:.3f}), stands in"}


def model_costs(args: argparse.Namespace, specs: list) -> dict:
    """{model name: (KernelCostModel, info)}, one table choice per distinct dims (``--cost_table`` at its own)."""
    given_dims = KernelCostModel(None, table=args.cost_table).dims if args.cost_table else None
    by_dims = {}
    for spec in specs:
        if spec.dims not in by_dims:
            table = args.cost_table if spec.dims == given_dims else None
            by_dims[spec.dims] = select_cost_model(args.gpu, spec.dims, table)
    return {s.name: by_dims[s.dims] for s in specs}


def measure_this_device(args: argparse.Namespace, rank: int, specs: list, costs: dict) -> tuple:
    """(this device's entry: every model measured on the held-out corpus, its temperature (C) before the
    run or None unmetered)."""
    root = stdlib_root()
    _, heldout = split_by_file(corpus_files(root))
    streams = heldout_streams(root, heldout, args.eval_bytes)
    text = torch.cat(streams)
    env = DeviceEnv(args.device, rank)
    current_temp_c = env.meter.read().temperature_c if env.metered else None
    return run_device(env, args, specs, costs, text, streams), current_temp_c
