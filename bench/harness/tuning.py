"""What the tuners share: timing block-config candidates against a reference, and writing a GPU's config file.

``python -m bench.tune_kernels``, ``bench.tune_moe`` and ``bench.tune_routing`` measure candidates with
``time_candidates`` and write ``kernels/configs/<op>/<GPU_name>.json`` with ``write_tuned``; ``kept_shapes``
keeps an earlier file's entries at the shapes a run did not re-tune.
"""
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing

from bench.kernels import rel_error
from calibration.results import provenance, write_json_atomic
from kernels import config as _config


def time_candidates(candidates: list, run: Callable[[dict], torch.Tensor],
                    reference: Callable[[], torch.Tensor]) -> list:
    """[(median_ms or None, error text or None, cfg)] for each candidate; wrong results count as failures."""
    expected = reference()
    results = []
    for cfg in candidates:
        try:
            out = run(cfg)
            err = rel_error(out, expected)
            if not err < 1e-2:
                raise AssertionError(f"relative error {err:.2e}")
            results.append((triton.testing.do_bench(lambda: run(cfg), warmup=25, rep=100, return_mode="median"),
                            None, cfg))
        except Exception as exc:  # a config that fails to compile (e.g. too much shared memory) is skipped
            results.append((None, f"{type(exc).__name__}: {str(exc)[:200]}", cfg))
    return results


def tuned_path(op: str, gpu: str) -> Path:
    """``op``'s config file for the GPU named ``gpu``."""
    return _config.CONFIG_DIR / op / f"{_config.config_file_stem(gpu)}.json"


def write_tuned(op: str, gpu: str, entries: list, measured: list, dtype_name: str, kept: dict | None = None) -> None:
    """Write ``op``'s config file for ``gpu``: tuned entries first, then the default entries (fp32 fallback);
    ``kept`` goes into the ``tuned`` section (what an earlier run tuned and this one kept)."""
    path = tuned_path(op, gpu)
    fallback, _ = _config.load_entries(op, "default")
    major, minor = torch.cuda.get_device_capability()  # a same-architecture card without its own file reads this one
    tuned = {"dtype": dtype_name, "provenance": provenance(), "buckets": measured} | ({"kept": kept} if kept else {})
    write_json_atomic(path, {"compute_capability": f"{major}.{minor}", "entries": entries + list(fallback),
                             "tuned": tuned})
    print(f"  wrote {path}")


def kept_shapes(earlier: dict | None, tuned_shapes: list) -> tuple:
    """(entries, measured records, {"shapes", "provenance"} or None) of an earlier config file ``earlier`` at
    the shapes this run did not tune: re-tuning one shape keeps the others' entries."""
    if earlier is None:
        return [], [], None
    retuned = {(shape.E, shape.I) for shape in tuned_shapes}
    entries = [e for e in earlier["entries"] if "min_e" in e.get("when", {})
               and (e["when"]["min_e"], e["when"]["min_i"]) not in retuned]
    names = {shape.name for shape in tuned_shapes}
    tuned = earlier.get("tuned") or {}
    measured = [record for record in tuned.get("buckets", []) if record.get("shape") not in names]
    if not entries:
        return [], [], None
    shapes = sorted({record["shape"] for record in measured})
    earlier_kept = tuned.get("kept") or {}
    return entries, measured, {"shapes": shapes, "provenance": tuned.get("provenance"),
                               **({"earlier": earlier_kept} if earlier_kept else {})}
