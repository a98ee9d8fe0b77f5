"""The cost model's side of the HPC comparison: which table predicts, the predictions beside each
measurement, and the report ``kernel_cost_model_test_results.json``. Every cost figure is a prediction."""
import tempfile
from dataclasses import asdict
from pathlib import Path

from calibration.priors import DATASHEETS, prior_table
from calibration.results import provenance, write_json_atomic
from costmodel.kernel_cost_model import KernelCostModel
from costmodel.ops import ModelDims
from costmodel.table import find_table, table_names

NO_GPU = "no NVIDIA GPU"
PRIOR_PROXY_GPU = "H200"  # the stand-in datasheet for a GPU calibration.priors does not know


def known_gpus() -> list:
    return sorted(set(table_names()) | set(DATASHEETS))


def select_cost_model(gpu: str, dims: ModelDims, table_path: str | None = None) -> tuple:
    """(KernelCostModel, info). ``--cost_table`` if given, else ``gpu``'s table (the user's, else
    the packaged one: ``costmodel.table.find_table``), at the model's dims: "measured" when the
    table was measured there, "modelled" when it was measured at other dims (the tile model fitted
    to it carries the costs, ``costmodel.curves``). Without a measured table, an analytic prior
    built here at the model's dims from ``gpu``'s datasheet (``PRIOR_PROXY_GPU``'s when
    ``calibration.priors`` has none), labelled "prior"."""
    if table_path is not None:
        model = KernelCostModel(None, table=table_path)
        return _at_dims(model, gpu, str(table_path), "given with --cost_table", dims)
    try:
        found = find_table(gpu)
    except ValueError:
        found, why = None, f"no {gpu} table (user or packaged)"
    if found is not None:
        model = KernelCostModel(gpu)
        if model.table["source"] == "measured":
            return _at_dims(model, gpu, str(found), f"the {gpu} table {found}", dims)
        why = f"the {gpu} table {found} is a prior at other dims {asdict(model.dims)}"
    model, sheet = prior_cost_model(gpu, dims)
    if sheet != gpu:
        why += f"; calibration.priors has no {gpu} datasheet, so the prior uses {sheet}'s as a stand-in"
    return model, _cost_info(model, gpu, f"in-process prior (calibration.priors.prior_table('{sheet}', dims))",
                             why + ": an analytic roofline prior at the model's dims, not a measurement")


def _at_dims(model, gpu, table, why, dims):
    """A measured table's model at ``dims``, and its info: "measured" there, or "modelled"."""
    if model.dims == dims:
        return model, _cost_info(model, gpu, table, why + " is at the model's dims")
    info = _cost_info(model.with_dims(dims), gpu, table, why + f" was measured at other dims {asdict(model.dims)}: "
                      "the tile model fitted to it predicts at the model's dims (modelled, not measured there; "
                      "an op whose own shape the sweep ran is costed from those points, as each cost's source says)")
    return model.with_dims(dims), info | {"source": "modelled", "table_dims": asdict(model.dims)}


def prior_cost_model(gpu: str, dims: ModelDims) -> tuple:
    """(KernelCostModel of an analytic prior at ``dims``, the GPU whose datasheet it uses)."""
    sheet = gpu if gpu in DATASHEETS else PRIOR_PROXY_GPU
    with tempfile.TemporaryDirectory() as tmp:  # KernelCostModel reads a file; the prior lives only in this run
        path = Path(tmp) / f"{sheet}_prior.json"
        write_json_atomic(path, prior_table(sheet, dims))
        return KernelCostModel(None, table=path), sheet


def _cost_info(model, gpu, table, why):
    return {"label": "prediction", "predictions_for": gpu, "table_gpu": model.gpu_type,
            "source": model.table["source"], "table": table, "why": why, "dims": asdict(model.dims),
            "has_thermal_model": bool(model.table.get("thermal")),
            "has_memory_pressure_curves": bool(model.table.get("memory_pressure"))}


def predict(cost_model: KernelCostModel, info: dict, plan: list, excludes: list, entry: dict) -> dict:
    """The cost model's prediction for one call, beside the measurement (errors where measured).

    ``energy_per_call_j`` is the plan's kernels alone; ``..._with_gaps`` also charges the table's
    gap power over (measured latency - predicted kernel time), as for eager calls in
    ``bench.kcm_accuracy``, so it leans on the measured GPU latency (none on a CPU)."""
    kernels_only = cost_model.get_plan_cost(plan)
    tokens = entry["tokens_per_call"]
    out = {"label": "prediction", "table_source": info["source"], "table": info["table"],
           "energy_per_call_j": kernels_only["energy_joules"],
           "energy_per_token_j": kernels_only["energy_joules"] / tokens,
           "kernel_latency_ms": kernels_only["latency_ms"], "covers_all_work": not excludes, "excludes": list(excludes)}
    if entry["timer"] == "cuda_events":
        with_gaps = cost_model.get_plan_cost(plan, measured_latency_ms=entry["latency_ms_median"])
        out["energy_per_call_j_with_gaps"] = with_gaps["energy_joules"]
    else:
        out["energy_per_call_j_with_gaps"] = None
        out["with_gaps_reason"] = "the gap term needs the GPU's measured latency"
    measured = entry["measured"]
    for key in ("energy_per_call_j", "energy_per_call_j_with_gaps"):
        error_key = "error_pct" + key[len("energy_per_call_j"):]
        out[error_key] = None if measured is None or out[key] is None else \
            (out[key] - measured["energy_per_call_j"]) / measured["energy_per_call_j"] * 100.0
    if measured is None:
        out["error_reason"] = f"no measured energy: {entry['measured_reason']}"
    return out


TOKEN_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)
SEQUENCE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
FACTOR_OP, FACTOR_BATCH = "swiglu_ffn", 64
ASSUMED_TEMP_C = 40.0


def cost_model_report(cost_model: KernelCostModel, info: dict, devices: list, current_temp_c: float | None) -> dict:
    """kernel_cost_model_test_results.json: op costs, thermal and memory-pressure factors, thermal-safe
    batch sizes, and every prediction beside its measurement. All cost figures are predictions."""
    return {"schema": 1, "provenance": provenance(), "cost_model": info,
            "op_costs": {op: [op_cost(cost_model, op, b) for b in op_batches(op)] for op in cost_model.ops},
            "thermal_factors": thermal_factors(cost_model),
            "memory_pressure_factors": pressure_factors(cost_model),
            "thermal_safe_batch_sizes": thermal_safe(cost_model, current_temp_c),
            "measured_vs_prior": measured_vs_prior(cost_model, info),
            "predicted_vs_measured": prediction_rows(devices)}


def op_batches(op: str) -> tuple:
    return SEQUENCE_BATCHES if op in ("attention_qk", "attention_av", "flash_attention") else TOKEN_BATCHES


def measured_vs_prior(cost_model: KernelCostModel, info: dict) -> dict:
    """A measured table's op costs against the analytic prior at the same dims (measured / prior)."""
    if cost_model.is_prior:
        return {"ops": None, "reason": "the table in use is itself a prior: nothing measured at these dims"}
    prior, sheet = prior_cost_model(info["predictions_for"], cost_model.dims)
    ops = {op: [{"batch_size": b,
                 "energy_ratio": cost_model.get_cost(op, b)["energy_joules"] / prior.get_cost(op, b)["energy_joules"],
                 "latency_ratio": cost_model.get_cost(op, b)["latency_ms"] / prior.get_cost(op, b)["latency_ms"]}
                for b in op_batches(op)] for op in cost_model.ops if op in prior.ops}
    return {"prior_datasheet": sheet, "ratio": "measured-table prediction / prior prediction", "ops": ops}


def op_cost(cost_model: KernelCostModel, op: str, batch_size: int) -> dict:
    cost = cost_model.get_cost_breakdown(op, batch_size)
    return {"batch_size": batch_size, "energy_j": cost["energy_joules"], "latency_ms": cost["latency_ms"],
            "power_w": cost["power_w"], "static_energy_j": cost["static_energy_joules"],
            "dynamic_energy_j": cost["dynamic_energy_joules"], "compute_bound_ms": cost["compute_bound_ms"],
            "memory_bound_ms": cost["memory_bound_ms"], "source": cost["source"],
            "energy_source": cost["energy_source"]}


def thermal_factors(cost_model: KernelCostModel) -> dict:
    thermal = cost_model.table.get("thermal")
    if not thermal or not thermal.get("clock_vs_temp"):
        return {"points": None, "reason": "the table has no thermal model (priors carry none)"}
    base = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH)
    coolest = thermal["clock_vs_temp"][0]["temp_c"]
    temps = sorted({coolest, 50.0, 65.0, 80.0, thermal.get("slowdown_temp_c") or 89.0})
    points = []
    for temp in temps:
        cost = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH, current_temp=temp)
        points.append({"temp_c": temp, "latency_stretch": cost["latency_ms"] / base["latency_ms"],
                       "energy_stretch": cost["energy_joules"] / base["energy_joules"], "source": cost["source"],
                       "warning": cost.get("warning")})
    return {"op": FACTOR_OP, "batch_size": FACTOR_BATCH, "points": points}


def pressure_factors(cost_model: KernelCostModel) -> dict:
    base = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH)
    points = []
    for pressure in (0.0, 0.25, 0.5, 0.75, 0.9):
        cost = cost_model.get_cost(FACTOR_OP, FACTOR_BATCH, memory_pressure=pressure)
        points.append({"memory_pressure": pressure, "latency_stretch": cost["latency_ms"] / base["latency_ms"],
                       "source": cost["source"]})
    curve = "measured stretch curve" if cost_model.pressure_curve(FACTOR_OP) else "roofline (no measured curve)"
    return {"op": FACTOR_OP, "batch_size": FACTOR_BATCH, "basis": curve, "points": points}


def thermal_safe(cost_model: KernelCostModel, current_temp_c: float | None) -> dict:
    temp, temp_source = (current_temp_c, "NVML at the start of the run") if current_temp_c is not None \
        else (ASSUMED_TEMP_C, f"assumed ({NO_GPU} reading)")
    sizes = {op: {str(rise): cost_model.get_thermal_safe_batch_size(op, temp, rise) for rise in (0.1, 1.0, 5.0)}
             for op in cost_model.ops}
    if all(v is None for by_rise in sizes.values() for v in by_rise.values()):
        return {"ops": None, "reason": "the table has no thermal model (priors carry none)"}
    return {"current_temp_c": temp, "temp_source": temp_source, "max_temp_increase_c": [0.1, 1.0, 5.0], "ops": sizes}


def prediction_rows(devices: list) -> list:
    rows = []
    for device in devices:
        for name, entry in device["models"].items():
            for phase, p in [("forward", entry["forward"])] + [("decode", d) for d in entry["decode"]]:
                measured = p["measured"] or {}
                rows.append({"rank": device["rank"], "model": name, "phase": phase, "batch_size": p["batch_size"],
                             "predicted_energy_per_call_j": p["prediction"]["energy_per_call_j"],
                             "predicted_energy_per_call_j_with_gaps": p["prediction"]["energy_per_call_j_with_gaps"],
                             "measured_energy_per_call_j": measured.get("energy_per_call_j"),
                             "error_pct": p["prediction"]["error_pct"],
                             "error_pct_with_gaps": p["prediction"]["error_pct_with_gaps"],
                             "covers_all_work": p["prediction"]["covers_all_work"]})
    return rows


