"""The HPC comparison's verdicts: changes in words, model-vs-model comparisons, and the success criteria.

Every verdict is ``met``, ``not met`` or ``not measured`` (with the reason): a verdict that rests
on CPU timings (the torch references and Triton's interpreter) is never met or missed.
"""

BASELINE = "transformer"
ISO_BASELINE = "dense_iso"
CANDIDATE = "moe_energy_aware"
ENERGY_REDUCTION_TARGET_PCT = 15.0
PREDICTION_ERROR_TARGET_PCT = 10.0
MEMORY_TARGET_PCT = 80.0
THROUGHPUT_KEPT_FRACTION = 0.95  # "maintained": at least 95% of the baseline's tokens/s
HOST_OVERHEAD_TARGET = 0.10
GRAPH_DECODE_SPEEDUP_TARGET = 10.0
FLOOR_RATIO_TARGET = 1.5
CPU_TIMINGS = "CPU timings (torch references, Triton's interpreter) say nothing about a GPU"


def change(new: float | None, base: float | None, better: str, worse: str, lower_is_better: bool = True) -> str | None:
    """'12.3% less energy per token (better)': the sign in words, never a bare +/-."""
    if new is None or base is None:
        return None
    pct = (new - base) / base * 100.0
    if pct == 0:
        return "no change"
    improved = pct < 0 if lower_is_better else pct > 0
    size = f"{abs(pct):.1f}" if abs(pct) >= 0.1 else f"{abs(pct):.2g}"  # never a nonzero change shown as 0.0%
    return f"{size}% {better if improved else worse} ({'better' if improved else 'worse'})"


def energy_per_token(phase: dict) -> float | None:
    return (phase["measured"] or {}).get("energy_per_token_j")


def headline(entry: dict) -> dict:
    """The forward figures of one model entry that comparisons use."""
    forward = entry["forward"]
    return {"energy_per_token_j": energy_per_token(forward), "latency_ms": forward["latency_ms_median"],
            "throughput_tokens_per_s": forward["throughput_tokens_per_s"],
            "bits_per_byte": entry["quality"]["bits_per_byte"]}


def iso_reference(models: dict) -> str | None:
    """The iso-quality dense model's name: ``dense_iso`` if it was run, else the baseline (the
    ladder's smallest width already reached the MoE's quality, or no ladder was trained)."""
    return ISO_BASELINE if ISO_BASELINE in models else BASELINE


def comparison_pairs(models: dict) -> list:
    """(model, reference): every model against the baseline, the MoEs against the iso-quality dense
    model, and the router against plain top-k (its own effect)."""
    pairs = [(name, BASELINE) for name in models if name != BASELINE]
    if ISO_BASELINE in models:
        pairs += [(name, ISO_BASELINE) for name in ("moe_energy_aware", "moe_topk") if name in models]
    return pairs + ([("moe_energy_aware", "moe_topk")] if {"moe_energy_aware", "moe_topk"} <= set(models) else [])


def compare_phase(new: dict, base: dict) -> dict:
    return {"energy_per_token": change(energy_per_token(new), energy_per_token(base), "less energy per token",
                                       "more energy per token"),
            "latency": change(new["latency_ms_median"], base["latency_ms_median"], "faster", "slower"),
            "throughput": change(new["throughput_tokens_per_s"], base["throughput_tokens_per_s"],
                                 "higher throughput", "lower throughput", lower_is_better=False)}


def comparisons(models: dict) -> dict:
    out = {}
    for name, ref in comparison_pairs(models):
        new, base = models[name], models[ref]
        quality = change(new["quality"]["bits_per_byte"], base["quality"]["bits_per_byte"],
                         "lower held-out bits/byte", "higher held-out bits/byte")
        decode = {str(n["batch_size"]): compare_phase(n, b) for n, b in zip(new["decode"], base["decode"])}
        out[f"{name}_vs_{ref}"] = {"model": name, "vs": ref, "forward": compare_phase(new["forward"], base["forward"]),
                                   "quality": quality, "decode": decode}
    return out


def ttt_on_vs_off(models: dict) -> dict | None:
    """Held-out quality of the same checkpoint with test-time training on (transformer_ttt) and off."""
    if "transformer_ttt" not in models:
        return None
    on, off = models["transformer_ttt"]["quality"], models["transformer"]["quality"]
    if on["bits_per_byte"] is None or off["bits_per_byte"] is None:
        return None
    return {"on_bits_per_byte": on["bits_per_byte"], "off_bits_per_byte": off["bits_per_byte"],
            "files": on["files"], "bytes": on["bytes"], "ttt_updates": on["ttt"]["updates"],
            "change": change(on["bits_per_byte"], off["bits_per_byte"], "lower bits/byte", "higher bits/byte")}


def candidate_name(models: dict) -> str:
    return CANDIDATE if CANDIDATE in models else "transformer_ttt"


def criterion(text: str, status: str, value: float | None = None, detail: str | None = None) -> dict:
    return {"criterion": text, "status": status, "value": value, "detail": detail}


def success_criteria(device: dict, on_gpu: bool) -> list:
    models = device["models"]
    candidate = candidate_name(models)
    out = [energy_criterion(models, candidate, ref, device) for ref in dict.fromkeys((iso_reference(models),
                                                                                       BASELINE))]
    out += [prediction_criterion(models, device), throttle_criterion(device), memory_criterion(models, device),
            throughput_criterion(models, candidate, on_gpu)]
    return out + deployment_criteria(models, on_gpu)


def energy_criterion(models: dict, candidate: str, reference: str, device: dict) -> dict:
    kind = "iso-quality dense" if reference == ISO_BASELINE else "dense at the preset's width"
    text = (f"energy per token reduced > {ENERGY_REDUCTION_TARGET_PCT:.0f}% vs {reference} ({kind}; {candidate}, "
            f"forward, {models[candidate]['mode']} mode)")
    cand, base = headline(models[candidate]), headline(models[reference])
    if cand["energy_per_token_j"] is None or base["energy_per_token_j"] is None:
        return criterion(text, "not measured", detail=device["energy_reason"])
    reduction = (1.0 - cand["energy_per_token_j"] / base["energy_per_token_j"]) * 100.0
    detail = f"{reduction:.1f}% reduction"
    if reference == ISO_BASELINE or reference == iso_reference(models):
        detail += f"; {models[candidate]['quality'].get('bits_per_byte')} vs " \
                  f"{models[reference]['quality'].get('bits_per_byte')} held-out bits/byte"
    return criterion(text, "met" if reduction > ENERGY_REDUCTION_TARGET_PCT else "not met", reduction, detail)


def prediction_criterion(models: dict, device: dict) -> dict:
    """Kernel-sum predictions (no measured latency in them) against the meter, for every phase of
    every model whose plan covers all its work and whose table was measured at its dims."""
    text = (f"energy prediction error < {PREDICTION_ERROR_TARGET_PCT:.0f}% (sum of kernel costs, no measured "
            "latency as input, vs NVML; models with a measured table at their dims)")
    errors, unjudged = {}, []
    for name, entry in models.items():
        for phase in [entry["forward"], *entry["decode"]]:
            pred = phase["prediction"]
            if not pred["covers_all_work"] or pred["error_pct"] is None:
                continue
            if pred["table_source"] != "measured":  # a prior, or a table measured at other dims
                unjudged.append(f"{name} ({pred['table_source']} {pred['error_pct']:+.1f}%)")
                continue
            errors[f"{name} {'forward' if 'seq_length' in phase else 'decode B' + str(phase['batch_size'])}"] = \
                pred["error_pct"]
    if not errors:
        why = device["energy_reason"] or ("no model has a table measured at its dims (predictions were priors "
                                          f"or modelled: {', '.join(sorted(set(unjudged)))}); calibrate at those "
                                          "dims (python -m bench.calibrate --d_model ...) to judge this")
        return criterion(text, "not measured", detail=why)
    worst = max(abs(v) for v in errors.values())
    return criterion(text, "met" if worst < PREDICTION_ERROR_TARGET_PCT else "not met", worst,
                     ", ".join(f"{k} {v:+.1f}%" for k, v in errors.items()))


def throttle_criterion(device: dict) -> dict:
    text = "no thermal throttling observed (NVML thermal/power slowdown bits)"
    record = device["throttling"]
    if record["observed"] is None:
        return criterion(text, "not measured", detail=record["reason"])
    return criterion(text, "not met" if record["observed"] else "met", record["reasons"])


def memory_criterion(models: dict, device: dict) -> dict:
    text = f"memory utilisation < {MEMORY_TARGET_PCT:.0f}% (peak allocated / device memory)"
    peaks = [p["memory_utilisation_pct"] for e in models.values() for p in [e["forward"], *e["decode"]]
             if p["memory_utilisation_pct"] is not None]
    if not peaks:
        return criterion(text, "not measured", detail=device["energy_reason"])
    return criterion(text, "met" if max(peaks) < MEMORY_TARGET_PCT else "not met", max(peaks))


def throughput_criterion(models: dict, candidate: str, on_gpu: bool) -> dict:
    text = f"throughput maintained ({candidate} >= {THROUGHPUT_KEPT_FRACTION:.0%} of {BASELINE}'s tokens/s, forward)"
    ratio = headline(models[candidate])["throughput_tokens_per_s"] / headline(models[BASELINE])[
        "throughput_tokens_per_s"]
    if not on_gpu:
        return criterion(text, "not measured", ratio, CPU_TIMINGS)
    return criterion(text, "met" if ratio >= THROUGHPUT_KEPT_FRACTION else "not met", ratio, f"{ratio:.2f}x")


def deployment_criteria(models: dict, on_gpu: bool) -> list:
    """The graph-mode targets: host overhead, graph vs eager decode, and the MoE decode's floor."""
    return [host_overhead_criterion(models, on_gpu), graph_speedup_criterion(models, on_gpu),
            floor_criterion(models, on_gpu)]


def host_overhead_criterion(models: dict, on_gpu: bool) -> dict:
    text = (f"graph mode: host overhead <= {HOST_OVERHEAD_TARGET:.0%} of the step (1 - kernel GPU time / step "
            "time), every model, forward and decode B=1")
    if not on_gpu:
        return criterion(text, "not measured", detail=CPU_TIMINGS)
    fractions = {}
    for name, entry in models.items():
        if entry["mode"] != "graph":
            return criterion(text, "not measured", detail="the run was not in graph mode (--mode)")
        phases = [("forward", entry["forward"])] + [("decode B1", p) for p in entry["decode"] if p["batch_size"] == 1]
        for label, phase in phases:
            fractions[f"{name} {label}"] = phase["host_overhead_fraction"]
    if any(v is None for v in fractions.values()):
        return criterion(text, "not measured", detail="the profiler gave no kernel times")
    worst = max(fractions.values())
    return criterion(text, "met" if worst <= HOST_OVERHEAD_TARGET else "not met", worst,
                     ", ".join(f"{k} {v:.1%}" for k, v in fractions.items()))


def graph_speedup_criterion(models: dict, on_gpu: bool) -> dict:
    text = f"graph-mode decode step of {BASELINE} at B=1 >= {GRAPH_DECODE_SPEEDUP_TARGET:.0f}x faster than eager"
    entry = models[BASELINE]
    eager = entry.get("eager_comparison")
    if not on_gpu or eager is None or entry["mode"] != "graph":
        return criterion(text, "not measured", detail=CPU_TIMINGS if not on_gpu else "run with --mode both")
    graph_b1 = [p for p in entry["decode"] if p["batch_size"] == 1]
    eager_b1 = [p for p in eager["decode"] if p["batch_size"] == 1]
    if not graph_b1 or not eager_b1:
        return criterion(text, "not measured", detail="no decode at B=1 (--decode)")
    speedup = eager_b1[0]["latency_ms_median"] / graph_b1[0]["latency_ms_median"]
    return criterion(text, "met" if speedup >= GRAPH_DECODE_SPEEDUP_TARGET else "not met", speedup,
                     f"{speedup:.1f}x")


def floor_criterion(models: dict, on_gpu: bool) -> dict:
    text = f"moe_topk decode step at B=1 within {FLOOR_RATIO_TARGET}x of its weight-read floor"
    if "moe_topk" not in models:
        return criterion(text, "not measured", detail="no MoE in this run")
    b1 = [p for p in models["moe_topk"]["decode"] if p["batch_size"] == 1]
    if not on_gpu or not b1 or b1[0]["weight_read_floor"]["floor_ms"] is None:
        return criterion(text, "not measured", detail=CPU_TIMINGS if on_gpu is False else "no decode at B=1")
    ratio = b1[0]["weight_read_floor"]["latency_over_floor"]
    return criterion(text, "met" if ratio <= FLOOR_RATIO_TARGET else "not met", ratio,
                     f"{ratio:.2f}x ({b1[0]['weight_read_floor']['weight_bytes_touched'] / 1e6:.0f} MB touched)")
