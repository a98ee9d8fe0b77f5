"""The HPC comparison's PNG plots (atomic writes): energy per token, latency, predicted vs measured
energy, and J/token against held-out bits/byte at decode."""
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is optional: imported where the plots are drawn
    from matplotlib.figure import Figure

PARETO_DECODE_BATCHES = (16, 64)


def write_plots(devices: list, output_dir: str | Path) -> dict:
    """PNG plots; {name: path} or {name: why skipped}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"skipped": f"matplotlib is not installed ({exc}); pip install matplotlib"}
    label = (lambda d, name: f"{name}\n(rank {d['rank']})") if len(devices) > 1 else (lambda d, name: name)
    pairs = [(d, name, e) for d in devices for name, e in d["models"].items()]
    out = {"energy_per_token": plot_energy(plt, pairs, label, output_dir),
           "latency": plot_latency(plt, pairs, label, output_dir)}
    out["predicted_vs_measured_energy"] = plot_predicted_vs_measured(plt, pairs, output_dir)
    out["energy_vs_quality"] = plot_energy_vs_quality(plt, pairs, output_dir)
    return out


def plot_energy(plt: ModuleType, pairs: list, label: Callable[[dict, str], str], output_dir: str | Path) -> str:
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(pairs)), 4))
    xs = range(len(pairs))
    measured = [(e["forward"]["measured"] or {}).get("energy_per_token_j") for _, _, e in pairs]
    predicted = [e["forward"]["prediction"]["energy_per_token_j"] for _, _, e in pairs]
    if any(m is not None for m in measured):
        ax.bar([x - 0.2 for x in xs], [m or 0.0 for m in measured], 0.4, label="measured (NVML)")
    else:
        ax.set_title(f"measured energy: none ({pairs[0][0]['energy_reason']})")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, hatch="//", alpha=0.6,
           label="prediction (each model's table, kernels only)")
    ax.set_xticks(list(xs), [label(d, n) for d, n, _ in pairs], rotation=15)
    ax.set_ylabel("energy per token (J), forward")
    ax.legend()
    return save(fig, plt, Path(output_dir) / "energy_per_token.png")


def plot_latency(plt: ModuleType, pairs: list, label: Callable[[dict, str], str], output_dir: str | Path) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(12, 3 * len(pairs)), 4.5))
    xs = range(len(pairs))
    left.bar(list(xs), [e["forward"]["latency_ms_median"] for _, _, e in pairs])
    left.set_xticks(list(xs), [label(d, n) for d, n, _ in pairs], rotation=15)
    left.set_ylabel("forward latency per batch (ms, median)")
    for d, name, e in pairs:
        if e["decode"]:
            right.plot([p["batch_size"] for p in e["decode"]], [p["latency_ms_median"] for p in e["decode"]],
                       marker="o", label=label(d, name))
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("decode batch size")
    right.set_ylabel("decode step latency (ms)")
    if right.has_data():
        right.legend()
    return save(fig, plt, Path(output_dir) / "latency.png")


def plot_predicted_vs_measured(plt: ModuleType, pairs: list, output_dir: str | Path) -> str:
    points = [(p["prediction"]["energy_per_call_j"], p["measured"]["energy_per_call_j"], name)
              for _, name, e in pairs for p in [e["forward"], *e["decode"]] if p["measured"] is not None]
    if not points:
        return f"skipped: no measured energy ({pairs[0][0]['energy_reason']})"
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in dict.fromkeys(n for _, _, n in points):
        ax.scatter([m for p, m, n in points if n == name], [p for p, m, n in points if n == name], label=name)
    low, high = min(min(p, m) for p, m, _ in points), max(max(p, m) for p, m, _ in points)
    ax.plot([low, high], [low, high], "k--", linewidth=1, label="prediction = measurement")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured energy per call (J, NVML)")
    ax.set_ylabel("predicted energy per call (J, sum of kernel costs)")
    ax.legend(fontsize=7)
    return save(fig, plt, Path(output_dir) / "predicted_vs_measured_energy.png")


def plot_energy_vs_quality(plt: ModuleType, pairs: list, output_dir: str | Path) -> str:
    """Measured J/token against held-out bits/byte, one point per model, at decode B=16 and B=64."""
    points = {b: [] for b in PARETO_DECODE_BATCHES}
    for _, name, e in pairs:
        bits = e["quality"]["bits_per_byte"]
        for p in e["decode"]:
            if bits is not None and p["measured"] is not None and p["batch_size"] in points:
                points[p["batch_size"]].append((bits, p["measured"]["energy_per_token_j"], name))
    if not any(points.values()):
        why = pairs[0][0]["energy_reason"] or "no model has both a checkpoint and a decode at B=16 or 64"
        return f"skipped: needs measured energy and held-out quality ({why})"
    fig, axes = plt.subplots(1, len(points), figsize=(5.5 * len(points), 4.5))
    for ax, (batch, rows) in zip(axes, points.items()):
        for bits, joules, name in rows:
            ax.scatter([bits], [joules], label=name)
            ax.annotate(name, (bits, joules), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("held-out bits/byte (lower is better)")
        ax.set_ylabel(f"energy per token (J, NVML), decode B={batch}")
        ax.set_title(f"decode B={batch}")
    return save(fig, plt, Path(output_dir) / "energy_vs_quality.png")


def save(fig: "Figure", plt: ModuleType, path: Path) -> str:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")  # atomic, as the JSON files
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


