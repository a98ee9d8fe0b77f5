"""Analytic prior tables for GPUs we have not measured, from datasheet figures.

A prior predicts each op's latency with the roofline (the larger of FLOPs over peak dense
bf16/fp16 throughput and bytes over HBM bandwidth) and its power as the TDP (the roofline assumes
the binding unit runs flat out, so this is an upper bound on power). Every prior table says
``"source": "prior"``; nothing built here is ever reported as a measurement.
``python -m calibration.priors`` rewrites ``calibration/tables/{A100,V100,H200}.json``.
"""
import sys
from dataclasses import asdict

from costmodel.ops import FP8_OPS, OPS, ModelDims, work
from costmodel.validate import count, finite_number

# NVIDIA datasheets (SXM parts): peak dense tensor TFLOP/s, HBM TB/s, TDP W
# (and dense FP8 TFLOP/s where the GPU has FP8; the others get no FP8 ops)
DATASHEETS = {
    "A100": dict(name="NVIDIA A100-SXM4-80GB", peak_tflops=312.0, hbm_tb_s=2.039, tdp_w=400.0),
    "V100": dict(name="NVIDIA V100-SXM2-32GB", peak_tflops=125.0, hbm_tb_s=0.900, tdp_w=300.0),  # fp16 (no bf16)
    "H200": dict(name="NVIDIA H200 SXM 141GB", peak_tflops=989.0, fp8_peak_tflops=1979.0, hbm_tb_s=4.8, tdp_w=700.0),
    "H100": dict(name="NVIDIA H100 80GB HBM3", peak_tflops=989.0, fp8_peak_tflops=1979.0, hbm_tb_s=3.35,
                 tdp_w=700.0),
}
# the committed prior tables: GPUs we have no measured table for (H100's datasheet serves
# in-process priors at other dims, e.g. the benchmark's; its committed table is measured)
PRIOR_TABLES = ("A100", "V100", "H200")
# Datasheets give no idle power: priors scale TDP by the idle fraction measured on our H100
# (73 W of a 700 W limit, 2026-11-26); the table records this.
IDLE_FRACTION_OF_TDP = 73.0 / 700.0
PRIOR_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def prior_point(op: str, batch_size: int, dims: "ModelDims", sheet: dict) -> dict:
    """The roofline point of ``op`` at ``batch_size`` (an int >= 1) tokens or sequences at ``dims`` on the GPU
    of ``sheet`` (a ``DATASHEETS`` entry's form; an FP8 op needs ``fp8_peak_tflops``)."""
    batch_size = count("batch_size", batch_size)
    if not isinstance(dims, ModelDims):
        raise TypeError(f"dims must be a costmodel.ops.ModelDims, got {type(dims).__name__}")
    if not isinstance(sheet, dict):
        raise TypeError(f"sheet must be a dict like those of calibration.priors.DATASHEETS, got {type(sheet).__name__}")
    for key in ("peak_tflops", "hbm_tb_s", "tdp_w") + (("fp8_peak_tflops",) if op in FP8_OPS else ()):
        finite_number(f"sheet[{key!r}]", sheet.get(key), low=0.0, low_open=True)
    flops, nbytes = work(op, batch_size, dims)
    compute_s = flops / (sheet["fp8_peak_tflops" if op in FP8_OPS else "peak_tflops"] * 1e12)
    memory_s = nbytes / (sheet["hbm_tb_s"] * 1e12)
    latency_s = max(compute_s, memory_s)
    return {"batch_size": batch_size, "latency_ms": latency_s * 1e3, "energy_j": sheet["tdp_w"] * latency_s,
            "power_w": sheet["tdp_w"], "flops": flops, "bytes": nbytes, "memory_gb": nbytes / 1e9}


def prior_table(gpu: str, dims: "ModelDims" = ModelDims()) -> dict:
    """The prior table of ``gpu`` (a key of ``DATASHEETS``) at ``dims`` (a ``ModelDims``)."""
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a GPU name (str), got {type(gpu).__name__}")
    if gpu not in DATASHEETS:
        raise ValueError(f"no datasheet for GPU {gpu!r}; known: {', '.join(sorted(DATASHEETS))}")
    if not isinstance(dims, ModelDims):
        raise TypeError(f"dims must be a costmodel.ops.ModelDims, got {type(dims).__name__} "
                        "(ModelDims(**mapping) makes one from a mapping)")
    sheet = DATASHEETS[gpu]
    return {
        "schema": 1,
        "gpu": gpu,
        "source": "prior",
        "note": "Analytic roofline prior from datasheet figures; not a measurement.",
        "datasheet": sheet | {"idle_power_w": sheet["tdp_w"] * IDLE_FRACTION_OF_TDP,
                              "idle_power_source": "TDP x the idle fraction measured on an H100 (73 W / 700 W)"},
        "dims": asdict(dims),
        "idle_power_w": sheet["tdp_w"] * IDLE_FRACTION_OF_TDP,
        "peak_flops": sheet["peak_tflops"] * 1e12,
        "hbm_bytes_per_s": sheet["hbm_tb_s"] * 1e12,
        "thermal": None,
        "thermal_missing_reason": "priors carry no thermal model: calibrate on the GPU to fit one",
        "ops": {op: {"points": [prior_point(op, b, dims, sheet) for b in PRIOR_BATCH_SIZES]}
                for op in OPS if op not in FP8_OPS or "fp8_peak_tflops" in sheet},
    } | ({} if "fp8_peak_tflops" in sheet else {"fp8_ops_missing_reason": f"the {gpu} has no FP8"})


def main(argv: list | None = None) -> int:
    from calibration.results import write_json_atomic
    from costmodel.kernel_cost_model import TABLE_DIR
    for gpu in PRIOR_TABLES:
        path = TABLE_DIR / f"{gpu}.json"
        write_json_atomic(path, prior_table(gpu))
        print(f"wrote {path} (prior)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
