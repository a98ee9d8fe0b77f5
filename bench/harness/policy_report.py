"""The routing-policy comparison: the sweep, the hot-state check, the targets and the plot.

``run_policies`` measures every policy (``bench.harness.policies``) at every decode batch and in
the forward, then the hot-state check and the test-time update's own energy; ``summarize``
states each target of the comparison as measured ratios against plain top-k (met or not, by how
much); ``plot_energy_vs_quality`` draws J/token against held-out bits/byte at each decode batch,
every policy a point.
"""
import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.harness.measure import DeviceEnv
from bench.harness.plots import save
from bench.harness.policies import (OBJECTIVE_WEIGHTS, RECORDED_STEPS, DecodeStream, Policy, PolicyModel,
                                    decode_quality, decode_timing, measure_decode, measure_forward, merged_timings,
                                    record_moe_inputs, stream_rows, ttt_update_energy)
from calibration.nvml_meter import GpuMeter
from calibration.trace import ReplayNvml, record
from router.monitor import HardwareMonitor

TARGET_BATCH = 16
MAX_BPB_LOSS = 0.01  # <= 1% higher held-out bits/byte than plain top-k
MOE_ENERGY_RATIO = 0.6
STEP_ENERGY_RATIO = 0.75
B1_OVERHEAD_FRACTION, B1_OVERHEAD_US, B1_ENERGY_FRACTION = 0.03, 5.0, 0.01
HOT_BELOW_SLOWDOWN_C = 2.0
_STARTED_S = time.perf_counter()  # progress lines carry the seconds since import


def _progress(what):
    print(f"[router_policies] {time.perf_counter() - _STARTED_S:6.0f} s  {what}", flush=True)


def decode_rows(args: argparse.Namespace, text: torch.Tensor, batch_size: int) -> torch.Tensor:
    steps = args.decode_steps
    budget = args.decode_bytes if batch_size > 1 else args.decode_bytes // 4  # B=1 steps cost a whole step per byte
    return stream_rows(text, batch_size, args.context, steps, budget, args.device)


def run_policies(env: DeviceEnv, model: PolicyModel, policies: list, monitor: HardwareMonitor | None,
                 text: torch.Tensor, forward_streams: list, args: argparse.Namespace,
                 save_partial: Callable[[dict], None] | None = None) -> dict:
    """{policy name: {"forward": ..., "decode": [...]}}; ``save_partial(results)`` after each decode
    batch (a run cut short keeps what it measured)."""
    out = {p.name: {"description": p.describe(), "keep_top_k": p.keep_top_k, "keep_share": p.keep_share,
                    "test_time_training": p.adapt, "decode": []} for p in policies}
    for batch_size in args.decode:
        rows = decode_rows(args, text, batch_size)
        model.install(Policy("topk", "topk"), monitor, track_stats=False)
        recorded = record_moe_inputs(model.lm, DecodeStream(model.lm, rows, args.context, graph=False),
                                     RECORDED_STEPS)
        entries = {}
        for policy in policies:
            _progress(f"{policy.name}: decode B={batch_size}, quality")
            entries[policy.name] = decode_quality(model, policy, monitor, rows, args.context, env.on_gpu)
        for name, timing in alternating_timings(env, model, policies, monitor, rows, recorded, args).items():
            out[name]["decode"].append(entries[name] | timing)
        del recorded
        if save_partial is not None:
            save_partial(out)
    for policy in policies:
        _progress(f"{policy.name}: forward")
        out[policy.name]["forward"] = measure_forward(env, model, policy, monitor, text, forward_streams, args)
    for policy in policies:
        if policy.adapt:
            _progress(f"{policy.name}: the test-time update alone")
            out[policy.name]["ttt_update"] = ttt_update_energy(env, model, policy, monitor,
                                                               decode_rows(args, text, TARGET_BATCH), args.context)
    model.restore()
    return out


def alternating_timings(env: DeviceEnv, model: PolicyModel, policies: list, monitor: HardwareMonitor | None,
                        rows: torch.Tensor, recorded: torch.Tensor | None, args: argparse.Namespace) -> dict:
    """{policy: timing}: ``args.energy_trials`` passes of one energy window each, the policy order
    reversed on every other pass, so a card's drift (warming, power-cap clock events) over the
    sweep weighs on every policy alike instead of favouring the ones measured first."""
    passes = {p.name: [] for p in policies}
    for n in range(args.energy_trials):
        for policy in (policies if n % 2 == 0 else policies[::-1]):
            _progress(f"{policy.name}: decode B={rows.shape[1]}, timing pass {n + 1}/{args.energy_trials}")
            passes[policy.name].append(decode_timing(env, model, policy, monitor, rows, args.context, recorded, 1))
    return {name: {part: merged_timings([t[part] for t in timings]) for part in timings[0]}
            for name, timings in passes.items()}


# ---- the hot-state check -------------------------------------------------------------------------

def hot_monitor(env: DeviceEnv) -> tuple:
    """(a HardwareMonitor replaying 1 s of this card's NVML timeline with its temperature set to
    HOT_BELOW_SLOWDOWN_C under the slowdown threshold, what was injected), or (None, why not)."""
    if not env.metered:
        return None, {"reason": env.energy_reason}
    trace = record(env.meter, 1.0)
    slowdown = trace["thresholds_c"].get("slowdown")
    if slowdown is None:
        return None, {"reason": "NVML gives no slowdown threshold, so there is no documented rise to check"}
    hot_c = float(slowdown) - HOT_BELOW_SLOWDOWN_C
    recorded_c = [r["temperature_c"] for r in trace["readings"] if r["temperature_c"] is not None]
    for reading in trace["readings"]:
        reading["temperature_c"] = hot_c
    injected = {"hot_temperature_c": hot_c, "slowdown_temp_c": float(slowdown),
                "recorded_temperature_c": max(recorded_c) if recorded_c else None,
                "method": "a 1 s NVML timeline of this card, recorded now and replayed to the router's monitor "
                          "with every temperature set to the hot value (an injected state: the card itself "
                          "was not that hot; the energy is still measured on the card)"}
    return HardwareMonitor(meter=GpuMeter(nvml=ReplayNvml(trace))), injected


def hot_check(env: DeviceEnv, model: PolicyModel, policy: Policy, cool_monitor: HardwareMonitor | None,
              text: torch.Tensor, args: argparse.Namespace) -> dict:
    """The policy at decode B=16 under an injected hot state: the energy weight the routers read
    (against the documented g(T)) and the measured J/token, beside the same at the live state."""
    monitor, injected = hot_monitor(env)
    if monitor is None:
        return {"measured": False} | injected
    rows = decode_rows(args, text, TARGET_BATCH)
    entry = {"policy": policy.name, "injected": injected}
    for label, mon in (("live", cool_monitor), ("hot", monitor)):
        _progress(f"hot check: {policy.name} at the {label} state")
        decode = measure_decode(env, model, policy, mon, rows, args.context, None, args)
        router = model.routers()[0]  # the routers that just ran: their state is the monitor's
        entry[label] = {"energy_weight": router.energy_weight().item(), "temperature_c": mon.temperature_c,
                        "decode": decode}
    gain, margin = router.thermal_gain, router.thermal_margin_c
    ramp = min(max((injected["hot_temperature_c"] - (injected["slowdown_temp_c"] - margin)) / margin, 0.0), 1.0)
    entry["documented_energy_weight_hot"] = OBJECTIVE_WEIGHTS["energy"] * (1.0 + gain * ramp)
    model.restore()
    return entry


# ---- targets -------------------------------------------------------------------------------------

def _at(entry, batch_size):
    return next((d for d in entry["decode"] if d["batch_size"] == batch_size), None)


def _energy(decode, part):
    return None if decode is None else decode.get(part, {}).get("energy_per_token_j")


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unmeasured (or b is 0)."""
    return None if a is None or b is None or b == 0 else a / b


def format_or_dash(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide when the value is unmeasured."""
    return format("-", spec.split(".")[0]) if value is None else format(value, spec)


def comparison_rows(results: dict) -> list:
    """Per policy and decode batch: bits/byte and energies against plain top-k's."""
    base = results["topk"]
    rows = []
    for name, entry in results.items():
        for decode in entry["decode"]:
            ref = _at(base, decode["batch_size"])
            stats = decode["router"] or {}
            rows.append({
                "policy": name, "batch_size": decode["batch_size"], "bits_per_byte": decode["bits_per_byte"],
                "bpb_vs_topk": ratio(decode["bits_per_byte"], ref["bits_per_byte"]) - 1.0,
                "step_j_per_token": _energy(decode, "step"), "moe_j_per_token": _energy(decode, "moe_layers"),
                "step_energy_vs_topk": ratio(_energy(decode, "step"), _energy(ref, "step")),
                "moe_energy_vs_topk": ratio(_energy(decode, "moe_layers"), _energy(ref, "moe_layers")),
                "step_latency_ms": decode["step"]["latency_ms_median"],
                "latency_vs_topk": ratio(decode["step"]["latency_ms_median"], ref["step"]["latency_ms_median"]),
                "distinct_experts_per_layer": stats.get("distinct_experts_per_call"),
                "changed_slot_fraction": stats.get("changed_slot_fraction"),
                "active_slots_per_token": stats.get("active_experts_per_token")})
    return rows


def summarize(results: dict, hot: dict, num_layers: int) -> dict:
    rows = comparison_rows(results)
    return {"rows": rows, "targets": {
        "b16_energy_at_kept_quality": _b16_target(rows),
        "beats_oea_at_every_quality": _oea_target(rows),
        "b1_overhead": _b1_target(results, num_layers),
        "hot_state": _hot_target(hot, results),
        "test_time_training": _ttt_verdict(results),
    }}


def _ours(rows, batch_size):
    return [r for r in rows if r["policy"].startswith("ours_") and not r["policy"].endswith("_ttt")
            and r["batch_size"] == batch_size]


def _b16_target(rows):
    rule = (f"decode B={TARGET_BATCH}: ours at <= {MAX_BPB_LOSS:.0%} higher bits/byte than top-k spends <= "
            f"{MOE_ENERGY_RATIO}x top-k's MoE-layer J/token and <= {STEP_ENERGY_RATIO}x its step J/token")
    kept = [r for r in _ours(rows, TARGET_BATCH) if r["bpb_vs_topk"] <= MAX_BPB_LOSS]
    if not _ours(rows, TARGET_BATCH):
        return {"rule": rule, "met": None, "reason": f"B={TARGET_BATCH} was not measured"}
    if not kept:
        best = min(_ours(rows, TARGET_BATCH), key=lambda r: r["bpb_vs_topk"])
        return {"rule": rule, "met": False, "reason": f"no setting of ours kept bits/byte within {MAX_BPB_LOSS:.0%}: "
                f"the closest, {best['policy']}, is {best['bpb_vs_topk']:+.2%}"}
    if any(r["moe_energy_vs_topk"] is None for r in kept):
        return {"rule": rule, "met": None, "reason": "energy not measured (no NVML)",
                "kept_quality_settings": [r["policy"] for r in kept]}
    best = min(kept, key=lambda r: r["moe_energy_vs_topk"])
    met = best["moe_energy_vs_topk"] <= MOE_ENERGY_RATIO and best["step_energy_vs_topk"] <= STEP_ENERGY_RATIO
    return {"rule": rule, "met": met, "setting": best["policy"], "bpb_vs_topk": best["bpb_vs_topk"],
            "moe_energy_vs_topk": best["moe_energy_vs_topk"], "step_energy_vs_topk": best["step_energy_vs_topk"]}


def _oea_target(rows):
    rule = (f"decode B={TARGET_BATCH}: for every OEA setting, some setting of ours at no worse bits/byte spends "
            "less MoE-layer J/token")
    oea = [r for r in rows if r["policy"].startswith("oea_") and r["batch_size"] == TARGET_BATCH]
    ours = _ours(rows, TARGET_BATCH)
    if not oea or any(r["moe_j_per_token"] is None for r in oea + ours):
        return {"rule": rule, "met": None, "reason": "not measured (no OEA setting, or no NVML energy)"}
    verdicts = []
    for o in oea:
        rivals = [r for r in ours if r["bits_per_byte"] <= o["bits_per_byte"]]
        best = min(rivals, key=lambda r: r["moe_j_per_token"]) if rivals else None
        verdicts.append({"oea": o["policy"], "oea_bits_per_byte": o["bits_per_byte"],
                         "oea_moe_j_per_token": o["moe_j_per_token"], "ours": best and best["policy"],
                         "ours_moe_j_per_token": best and best["moe_j_per_token"],
                         "beaten": best is not None and best["moe_j_per_token"] < o["moe_j_per_token"]})
    return {"rule": rule, "met": all(v["beaten"] for v in verdicts), "per_oea_setting": verdicts}


def _b1_target(results, num_layers):
    rule = (f"decode B=1: the router's own cost, ours' step against the same work without it (OEA at the same k0 "
            f"runs the same experts at batch 1; plain top-k for a share setting), <= {B1_OVERHEAD_FRACTION:.0%} "
            f"latency (<= {B1_OVERHEAD_US} us per layer) and <= {B1_ENERGY_FRACTION:.0%} energy")
    if _at(results["topk"], 1) is None:
        return {"rule": rule, "met": None, "reason": "B=1 was not measured"}
    per_setting = {}
    for name, entry in results.items():
        ours = _at(entry, 1)
        if not name.startswith("ours_") or name.endswith("_ttt") or ours is None:
            continue
        reference = _b1_reference(results, entry)
        base = _at(results[reference], 1)
        extra_ms = ours["step"]["latency_ms_median"] - base["step"]["latency_ms_median"]
        energy = ratio(_energy(ours, "step"), _energy(base, "step"))
        per_setting[name] = {"against": reference,
                             "latency_overhead_fraction": extra_ms / base["step"]["latency_ms_median"],
                             "overhead_us_per_layer": extra_ms * 1e3 / num_layers,
                             "energy_overhead_fraction": None if energy is None else energy - 1.0,
                             "bpb_vs_against": ours["bits_per_byte"] / base["bits_per_byte"] - 1.0}
    met = None
    if per_setting and all(v["energy_overhead_fraction"] is not None for v in per_setting.values()):
        met = all(v["latency_overhead_fraction"] <= B1_OVERHEAD_FRACTION and v["overhead_us_per_layer"] <=
                  B1_OVERHEAD_US and v["energy_overhead_fraction"] <= B1_ENERGY_FRACTION
                  for v in per_setting.values())
    return {"rule": rule, "met": met, "per_setting": per_setting}


def _b1_reference(results, ours):
    """The policy that runs ours' experts at batch 1 without its cost path: OEA at the same k0 where
    measured, else plain top-k."""
    same_keep = f"oea_k{ours['keep_top_k']}"
    return same_keep if ours["keep_top_k"] is not None and same_keep in results else "topk"


def _hot_target(hot, results):
    rule = ("with an injected hot state the routers' energy weight is the documented g(T), and the policy still "
            f"spends less J/token than plain top-k at B={TARGET_BATCH}")
    if hot is None or not hot.get("live"):
        return {"rule": rule, "met": None, "reason": (hot or {}).get("reason", "not run")}
    base = _energy(_at(results["topk"], TARGET_BATCH), "step")
    hot_j = _energy(hot["hot"]["decode"], "step")
    weight_ok = math.isclose(hot["hot"]["energy_weight"], hot["documented_energy_weight_hot"], rel_tol=1e-4)
    return {"rule": rule, "met": weight_ok and hot_j is not None and base is not None and hot_j < base,
            "energy_weight_live": hot["live"]["energy_weight"], "energy_weight_hot": hot["hot"]["energy_weight"],
            "energy_weight_documented": hot["documented_energy_weight_hot"],
            "hot_step_energy_vs_topk": ratio(hot_j, base),
            "live_step_energy_vs_topk": ratio(_energy(hot["live"]["decode"], "step"), base)}


def _ttt_verdict(results):
    verdicts = {}
    for name, entry in results.items():
        if not name.endswith("_ttt"):
            continue
        frozen = results.get(name[:-len("_ttt")])
        rows = []
        for decode in entry["decode"]:
            ref = _at(frozen, decode["batch_size"]) if frozen else None
            if ref is None:
                continue
            rows.append({"batch_size": decode["batch_size"],
                         "bpb_change": decode["bits_per_byte"] - ref["bits_per_byte"],
                         "step_energy_vs_frozen": ratio(_energy(decode, "step"), _energy(ref, "step")),
                         "updates": (decode["router"] or {}).get("ttt_updates")})
        pays = None
        if rows and all(r["step_energy_vs_frozen"] is not None for r in rows):
            pays = any(r["bpb_change"] < 0 for r in rows) or any(r["step_energy_vs_frozen"] < 1 for r in rows)
        verdicts[name] = {"against": name[:-len("_ttt")], "per_batch": rows, "update": entry.get("ttt_update"),
                          "pays": pays, "rule": "pays if it lowers bits/byte or step J/token at some decode batch "
                                                "against the same policy frozen (the updates' energy included)"}
    return verdicts or {"reason": "no test-time-training setting was run"}


# ---- the plot ------------------------------------------------------------------------------------

def plot_energy_vs_quality(results: dict, path: str | Path) -> dict:
    """J/token (MoE layers, top row; whole step, bottom) against held-out bits/byte per decode batch."""
    rows = comparison_rows(results)
    if all(r["step_j_per_token"] is None for r in rows):
        return {"skipped": "no NVML energy was measured (no GPU)"}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"skipped": f"matplotlib is not installed ({exc})"}
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches), 7), squeeze=False)
    markers = {"topk": ("k", "s"), "oea": ("tab:orange", "^"), "ours": ("tab:blue", "o")}
    for col, batch_size in enumerate(batches):
        for row, key, what in ((0, "moe_j_per_token", "MoE layers"), (1, "step_j_per_token", "whole step")):
            ax = axes[row][col]
            for r in (r for r in rows if r["batch_size"] == batch_size and r[key] is not None):
                color, marker = markers[r["policy"].split("_")[0]]
                ax.scatter(r["bits_per_byte"], r[key], c=color, marker=marker)
                ax.annotate(r["policy"], (r["bits_per_byte"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_title(f"decode B={batch_size}: {what}")
            ax.set_xlabel("held-out bits/byte at this batch")
            ax.set_ylabel("J/token (NVML)")
    return {"path": save(fig, plt, Path(path))}


def table_lines(rows: list) -> list:
    """A short text table (printed last by the CLI)."""
    lines = [f"{'policy':<16}{'B':>4}{'bpb':>8}{'d bpb':>8}{'MoE J/tok':>11}{'x topk':>7}{'step J/tok':>11}"
             f"{'x topk':>7}{'experts':>8}"]
    for r in rows:
        lines.append(f"{r['policy']:<16}{r['batch_size']:>4}{r['bits_per_byte']:>8.3f}{r['bpb_vs_topk']:>+8.2%}"
                     f"{format_or_dash(r['moe_j_per_token'], '>11.3e')}{format_or_dash(r['moe_energy_vs_topk'], '>7.2f')}"
                     f"{format_or_dash(r['step_j_per_token'], '>11.3e')}{format_or_dash(r['step_energy_vs_topk'], '>7.2f')}"
                     f"{format_or_dash(r['distinct_experts_per_layer'], '>8.1f')}")
    return lines


def sync_free_routers(model: PolicyModel, policies: list, monitor: HardwareMonitor | None,
                      device: torch.device) -> dict:
    """Each router kind called eagerly under ``torch.cuda.set_sync_debug_mode("error")`` (a host
    sync raises); None on a CPU."""
    if device.type != "cuda":
        return {"checked": False, "reason": "torch.cuda.set_sync_debug_mode needs a CUDA device"}
    x = torch.randn(16, model.lm.dims.d_model, device=device, dtype=model.lm.embed.dtype)
    out = {}
    for policy in policies:
        router = model.install(policy, monitor, track_stats=True).blocks[0].moe.gate
        router(x)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            router(x)
            out[policy.name] = "no host sync"
        except RuntimeError as exc:
            out[policy.name] = f"host sync: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.restore()
    return {"checked": True, "routers": out}
