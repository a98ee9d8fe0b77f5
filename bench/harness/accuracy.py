"""Error summaries of predictions against measurements (``bench.kcm_accuracy``, ``bench.kcm_replay``)."""
import statistics


def percentile(values: list, q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(rows: list, key: str) -> dict:
    """Median, p90 and max absolute percentage error of ``predicted_<key>`` against
    ``measured_<key>`` over ``rows``, the median signed error (+: predictions high), and n."""
    signed = [(r[f"predicted_{key}"] - r[f"measured_{key}"]) / r[f"measured_{key}"] * 100 for r in rows]
    errors = [abs(e) for e in signed]
    return {"median_ape_pct": statistics.median(errors), "p90_ape_pct": percentile(errors, 0.9),
            "max_ape_pct": max(errors), "median_signed_pct": statistics.median(signed), "n": len(errors)}
