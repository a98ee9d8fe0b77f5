"""The HPC comparison's outputs: the three JSON files (atomic writes), the plots, and the printed table."""
import argparse
import os
from pathlib import Path

import torch

from bench.harness.costs import NO_GPU, cost_model_report
from bench.harness.criteria import (BASELINE, candidate_name, comparisons, headline, iso_reference, success_criteria,
                                    ttt_on_vs_off)
from bench.harness.plots import write_plots
from calibration.results import provenance, write_json_atomic


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def phase_rows(entry: dict) -> list:
    rows = [("forward", entry["forward"])] + [(f"decode B{p['batch_size']}", p) for p in entry["decode"]]
    eager = entry.get("eager_comparison")
    if eager:
        rows += [("fwd eager", eager["forward"])] + [(f"dec B{p['batch_size']} eager", p) for p in eager["decode"]]
    return rows


def print_device_report(device: dict, compared: dict, criteria: list) -> None:
    print(f"\n== {device['device']} ({device.get('gpu_name', 'CPU')}), rank {device['rank']} ==")
    print(f"{'model':17} {'params total/active':>21} {'phase':>15} {'median ms':>10} {'tokens/s':>11} "
          f"{'host':>6} {'J/token measured':>17} {'J/token predicted':>18} {'error':>7} {'bits/byte':>9}")
    for name, entry in device["models"].items():
        params = entry["parameters"]
        for label, phase in phase_rows(entry):
            measured, pred = phase["measured"] or {}, phase["prediction"]
            print(f"{name:17} {params['total'] / 1e6:9.2f}M/{params['active_per_token'] / 1e6:8.2f}M "
                  f"{label:>15} {phase['latency_ms_median']:10.4f} {phase['throughput_tokens_per_s']:11.0f} "
                  f"{fmt(phase['host_overhead_fraction'], '.0%'):>6} "
                  f"{fmt(measured.get('energy_per_token_j'), '.3e'):>17} {pred['energy_per_token_j']:18.3e} "
                  f"{fmt(pred['error_pct'], '+.1f', '%'):>7} "
                  f"{fmt(entry['quality']['bits_per_byte'], '.3f') if label == 'forward' else '':>9}")
    if device["energy_reason"]:
        print(f"energy, power, temperature: null ({device['energy_reason']}); predicted J/token is a prediction")
    for name, entry in device["models"].items():
        print(f"{name}: predictions from the {entry['cost_model']['source']} table ({entry['cost_model']['why']})")
        if entry["quality"]["bits_per_byte"] is None:
            print(f"{name}: {entry['quality']['reason']}")
    for c in compared.values():
        said = [v for v in c["forward"].values() if v is not None] + ([c["quality"]] if c["quality"] else [])
        print(f"{c['model']} vs {c['vs']} (forward): {'; '.join(said)}")
    ttt = ttt_on_vs_off(device["models"])
    if ttt:
        print(f"TTT on vs off, {ttt['files']} long held-out files ({ttt['bytes']} bytes): "
              f"{ttt['on_bits_per_byte']:.4f} vs {ttt['off_bits_per_byte']:.4f} bits/byte, {ttt['change']}")
    print(f"success criteria ({candidate_name(device['models'])} vs {iso_reference(device['models'])} and "
          f"{BASELINE}):")
    for c in criteria:
        print(f"  [{c['status']}] {c['criterion']}" + (f": {c['detail']}" if c["detail"] else ""))


def parameters(args: argparse.Namespace) -> dict:
    def plain(v: object) -> object:
        if isinstance(v, (torch.device, Path)):
            return str(v)
        return v.as_dict() if hasattr(v, "as_dict") else v
    return {k: plain(v) for k, v in vars(args).items()}


def sizes_note(args: argparse.Namespace) -> str | None:
    if not args.cpu_sizes:
        return None
    return (f"{NO_GPU if not torch.cuda.is_available() else 'CPU run'}: small CPU sizes for "
            f"{', '.join(args.cpu_sizes)} (flags given are kept); CPU timings are the torch references (and the MoE "
            "routing kernel under Triton's interpreter), not a GPU's")


def write_outputs(args: argparse.Namespace, devices: list, costs: dict, current_temp_c: float | None,
                  selection: dict) -> None:
    out = Path(args.output_dir)
    on_gpu = args.device.type == "cuda"
    compared = {d["rank"]: comparisons(d["models"]) for d in devices}
    criteria = {d["rank"]: success_criteria(d, on_gpu) for d in devices}
    candidate = candidate_name(devices[0]["models"])
    note = sizes_note(args)
    infos = {name: info for name, (_, info) in costs.items()}
    results = {"schema": 2, "provenance": provenance(), "parameters": parameters(args), "sizes_note": note,
               "cost_models": infos, "baseline": BASELINE, "iso_quality": selection, "candidate": candidate,
               "devices": devices}
    write_json_atomic(out / "hpc_results.json", results)
    base_model, base_info = costs[BASELINE]
    write_json_atomic(out / "kernel_cost_model_test_results.json",
                      cost_model_report(base_model, base_info, devices, current_temp_c) | {"cost_models": infos})
    plots = write_plots(devices, out)
    summary = {"schema": 2, "provenance": provenance(), "hardware": [device_hardware(d) for d in devices],
               "parameters": parameters(args), "sizes_note": note, "baseline": BASELINE, "iso_quality": selection,
               "candidate": candidate, "cost_models": infos,
               "results": {d["rank"]: {name: headline(e) | {"parameters": e["parameters"], "mode": e["mode"]}
                                       for name, e in d["models"].items()} for d in devices},
               "comparisons": compared, "ttt_on_vs_off": {d["rank"]: ttt_on_vs_off(d["models"]) for d in devices},
               "success_criteria": criteria, "plots": plots,
               "files": ["hpc_results.json", "kernel_cost_model_test_results.json", "hpc_summary.json"]}
    write_json_atomic(out / "hpc_summary.json", summary)
    if note:
        print(note)
    print(f"iso-quality dense baseline: {selection['detail']}")
    for device in devices:
        print_device_report(device, compared[device["rank"]], criteria[device["rank"]])
    print(f"\nwrote {', '.join(str(out / f) for f in summary['files'])}")
    print("plots: " + "; ".join(f"{k}: {v}" for k, v in plots.items()))


def device_hardware(device: dict) -> dict:
    keys = ("rank", "device", "gpu_name", "gpu_uuid", "driver", "memory_total_gb", "l2_cache_bytes",
            "copy_bytes_per_s", "nvml_index", "energy_measured", "energy_reason", "idle_power_w")
    return {k: device.get(k) for k in keys} | {"cpu_count": os.cpu_count()}
