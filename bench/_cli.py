"""Argument helpers shared by the ``python -m bench.<name>`` entry points (command-line code only)."""
import argparse
import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.harness.presets import PRESETS, SEED, Preset
from calibration.energy import MIN_WINDOW_S
from calibration.nvml_meter import GpuMeter
from calibration.results import write_json_atomic
from calibration.sweep import detected_gpu

if TYPE_CHECKING:  # annotations only: cost_model_from and model_dims import them when called
    from costmodel.kernel_cost_model import KernelCostModel
    from costmodel.ops import ModelDims

MIN_EVAL_BYTES = 2  # evaluation predicts each held-out byte from the ones before it: 2 bytes, one prediction
DIM_FLAGS = ("d_model", "num_layers", "num_experts", "top_k", "expert_d_ff", "seq_length")
MOE_CPU_NEEDS_INTERPRETER = ("an MoE on --device cpu needs TRITON_INTERPRET=1 on a machine with CUDA: the routing "
                             "kernel takes CPU tensors only under Triton's interpreter")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def eval_bytes(text: str) -> int:
    """Held-out bytes to evaluate: at least ``MIN_EVAL_BYTES``, or no byte is predicted and there is no score."""
    value = positive_int(text)
    if value < MIN_EVAL_BYTES:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_EVAL_BYTES} (the evaluation predicts each held-out byte "
                                         f"from the ones before it: {MIN_EVAL_BYTES} bytes make one prediction), "
                                         f"got {text!r}")
    return value


def checked_float(text: str, ok: Callable[[float], bool], rule: str) -> float:
    """``text`` as a finite float for which ``ok(value)`` holds, else an argparse error saying ``rule``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return checked_float(text, lambda v: v > 0, "a positive finite number")


def non_negative_float(text: str) -> float:
    return checked_float(text, lambda v: v >= 0, "a finite number >= 0")


def window_s(text: str) -> float:
    """An energy window: finite and at least ``MIN_WINDOW_S``."""
    return checked_float(text, lambda v: v >= MIN_WINDOW_S, f"a finite number of seconds >= {MIN_WINDOW_S:g} "
                         "(an energy window spans 10+ updates of the ~100 ms NVML energy counter)")


def model_dims(text: str) -> "ModelDims":
    """An argparse type: ``name=value`` pairs of ``costmodel.ops.ModelDims`` fields, comma-separated
    (fields not given keep their defaults), e.g. ``d_model=3072,d_ff=8192,n_heads=24``."""
    from costmodel.ops import ModelDims
    fields = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not re.fullmatch(r"[0-9]+", value):
            raise argparse.ArgumentTypeError(f"must be name=integer pairs, comma-separated, got {part!r} in {text!r}")
        if name in fields:
            raise argparse.ArgumentTypeError(f"gives {name} twice in {text!r}")
        fields[name] = int(value)
    unknown = sorted(set(fields) - set(ModelDims.__dataclass_fields__))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fields {', '.join(unknown)}; "
                                         f"ModelDims has {', '.join(ModelDims.__dataclass_fields__)}")
    try:
        return ModelDims(**fields)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def comma_list(item: Callable[[str], object] = str, choices: Collection[str] | None = None,
               allow_empty: bool = False) -> Callable[[str], list]:
    """An argparse type: comma-separated values, each through ``item`` (and among ``choices``), none empty,
    none repeated; '' is the empty list with ``allow_empty``."""
    def parse(text: str) -> list:
        if allow_empty and not text.strip():
            return []
        parts = [part.strip() for part in text.split(",")]
        if "" in parts:
            raise argparse.ArgumentTypeError(f"must be comma-separated values, none empty, got {text!r}")
        values = [item(part) for part in parts]
        repeated = sorted({part for part, value in zip(parts, values) if values.count(value) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"repeats {', '.join(repeated)} in {text!r}: give each value once")
        unknown = [part for part, value in zip(parts, values) if choices is not None and value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return values
    return parse


def moe_cpu_without_interpreter(device: torch.device) -> bool:
    """Would an MoE on ``device`` launch the routing kernel on CPU tensors without the interpreter?"""
    return device.type == "cpu" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def add_preset_flags(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and the dim flags that refine the seed preset (``resolve_preset`` reads them)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model sizes (default: seed); the dim flags refine the seed preset only")
    for flag in DIM_FLAGS:
        parser.add_argument(f"--{flag}", type=positive_int,
                            help="each expert's d_ff (seed: 4 d_model)" if flag == "expert_d_ff" else None)


def resolve_preset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Preset:
    """The ``Preset`` the flags ask for: ``--preset`` as it is (a dim flag beside it is refused), or the
    seed preset refined by the dim flags (a new width scales the dense ladder with it)."""
    given = [f for f in DIM_FLAGS if getattr(args, f, None) is not None]
    if args.preset is not None:
        if given:
            parser.error(f"--{given[0]} conflicts with --preset {args.preset}: a preset fixes the model dims "
                         "(drop the flag, or the preset to refine the seed sizes)")
        return PRESETS[args.preset]
    changes = {f: getattr(args, f) for f in given}
    d_model = changes.get("d_model", SEED.d_model)
    if d_model % 32:
        parser.error(f"--d_model must be a multiple of 32 (attention heads of 32 or 64), got {d_model}")
    if "d_model" in changes:
        changes.setdefault("expert_d_ff", 4 * d_model)
        changes["dense_ladder"] = tuple(dict.fromkeys((d_model, 32 * round(1.5 * d_model / 32), 2 * d_model)))
    preset = replace(SEED, **changes)
    if preset.top_k > preset.num_experts:
        parser.error(f"--top_k ({preset.top_k}) must be <= --num_experts ({preset.num_experts})")
    if preset.seq_length < 2:
        parser.error(f"--seq_length must be >= 2 (decode caches seq_length // 2 positions), got {preset.seq_length}")
    return preset


def checked_output_dir(parser: argparse.ArgumentParser, path: str | Path, flag: str = "--output_dir") -> Path:
    """``path`` as a directory that exists and takes files, made if missing: checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        parser.error(f"{flag} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{flag} {path} cannot be created: {exc.strerror or exc}")
    if not os.access(path, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path} is not writable")
    return path


def checked_output_file(parser: argparse.ArgumentParser, path: str | Path, flag: str = "--output") -> Path:
    """``path`` as a file to write: not a directory, in a directory that takes files (made if missing);
    checked before any work."""
    path = Path(path)
    if path.is_dir():
        parser.error(f"{flag} {path} is a directory; give a file path")
    checked_output_dir(parser, path.parent, f"{flag} {path}: its directory")
    return path


def check_gpu(parser: argparse.ArgumentParser, requested: str, meter: GpuMeter) -> str:
    """The detected GPU's NVML name, or a usage error when ``--gpu`` is not this measurable GPU."""
    try:
        return detected_gpu(meter, requested)
    except ValueError as exc:
        parser.error(str(exc))


def add_table_flags(parser: argparse.ArgumentParser) -> None:
    """``--gpu`` and ``--table``: which cost table a command reads."""
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--table", default=None, help="default: the GPU's table, yours before the packaged one")


def cost_model_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> "KernelCostModel":
    """The ``KernelCostModel`` of ``--gpu`` / ``--table``; a parser error naming the flag otherwise."""
    from costmodel.kernel_cost_model import KernelCostModel
    try:
        return KernelCostModel(args.gpu, table=args.table)
    except ValueError as exc:
        parser.error(f"{'--table' if args.table else '--gpu'}: {exc}")


def resolve_device(parser: argparse.ArgumentParser, name: str, local_rank: int = 0) -> torch.device:
    """``--device`` (auto, cpu, cuda or cuda:N) as a torch.device: "cuda" and "auto" on a GPU
    machine take ``local_rank``'s GPU (torchrun's LOCAL_RANK); a parser error naming the flag for
    anything else, a CUDA device on a machine without one, or a GPU index beyond those visible."""
    if name not in ("auto", "cpu") and not re.fullmatch(r"cuda(:[0-9]+)?", name):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(name.partition(":")[2] or local_rank)
    if index >= torch.cuda.device_count():
        parser.error(f"--device {name}: GPU {index} is not visible ({torch.cuda.device_count()} are); "
                     "lower --nproc_per_node or the index")
    return torch.device("cuda", index)


def write_report(output: Path | None, report: dict) -> None:
    """Write ``report`` atomically to ``output`` (a checked ``--output``) and say so; nothing without one."""
    if output:
        write_json_atomic(output, report)
        print(f"wrote {output}")
