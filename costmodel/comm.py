"""The collective curves of a cost table: log-log between measured message sizes, linear in bytes
beyond them (``KernelCostModel.get_comm_cost``, ``comm_cost_per_byte``)."""
import bisect

from costmodel.curves import log_log_at


def piecewise_linear(points: list, x: float) -> float:
    """y at ``x`` on the polyline through sorted (x, y) ``points``, extending its end segments."""
    i = min(max(next((n for n, (px, _) in enumerate(points) if px > x), len(points)) - 1, 0), len(points) - 2)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _log_log(points, bytes_per_rank, key):
    """Log-log interpolation of ``key`` over points sorted by size; (value, where)."""
    xs = [p["bytes_per_rank"] for p in points]
    if bytes_per_rank in xs:
        return points[xs.index(bytes_per_rank)][key], "measured"
    if len(points) == 1:
        return points[0][key] * bytes_per_rank / xs[0], "extrapolated"  # linear in bytes: the only honest slope
    value = log_log_at(xs, [p[key] for p in points], bytes_per_rank)
    return value, "interpolated" if xs[0] < bytes_per_rank < xs[-1] else "extrapolated"


def interpolate_comm(points: list, bytes_per_rank: float, key: str) -> tuple:
    """``key`` of a collective at ``bytes_per_rank``; (value, where). Log-log between measured sizes;
    beyond them the end segment goes on linearly in bytes (latency + bytes / bandwidth), and below
    the smallest size no cheaper per byte than it (a fixed start-up cost only grows the share)."""
    xs = [p["bytes_per_rank"] for p in points]
    if len(points) == 1 or xs[0] <= bytes_per_rank <= xs[-1]:
        return _log_log(points, bytes_per_rank, key)
    value = piecewise_linear([(x, p[key]) for x, p in zip(xs, points)], bytes_per_rank)
    if bytes_per_rank < xs[0]:
        value = max(value, points[0][key] * bytes_per_rank / xs[0])
    return value, "extrapolated"


def secant_slope(points: list, bytes_per_rank: float, key: str) -> float:
    """d``key``/dbyte around ``bytes_per_rank``: the secant of the measured segment it lies in (at
    an inner measured size, of its two neighbours; beyond the range, of the end segment), >= 0."""
    xs = [p["bytes_per_rank"] for p in points]
    if len(points) == 1:
        return points[0][key] / xs[0]
    hi = min(max(bisect.bisect_right(xs, bytes_per_rank), 1), len(xs) - 1)
    lo = hi - 1
    if lo > 0 and xs[lo] == bytes_per_rank:
        lo -= 1
    slope = (points[hi][key] - points[lo][key]) / (xs[hi] - xs[lo])
    return max(slope, 0.0)  # timing noise can make a segment fall; more bytes never cost less


def comm_curves(table: dict) -> dict:
    """{(op, world_size): curve with its points sorted by size} from a table's collectives section."""
    curves = {}
    for op, by_world_size in (table.get("collectives") or {}).items():
        for world_size, curve in by_world_size.items():
            curves[op, int(world_size)] = curve | {"points": sorted(curve["points"], key=lambda p: p["bytes_per_rank"])}
    return curves
