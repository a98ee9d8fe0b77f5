"""One op's cost curve at any dims: the fitted tile model, corrected by the measured points.

``ShapeModel(table)`` fits each op once (``costmodel.fit``) over all its measured points, at
every shape the sweep ran. ``curve(op, dims)`` then gives the op's costs at knot batch sizes:
the measured batch sizes, every quarter power of two, and both sides of each step in the model:
where a tile count crosses a multiple of the SM count (one more wave) or the kernel switches
config (``_step_knots``), so a step is not smoothed over. At a shape the table measured (any dims
that agree on the dims the op reads, ``costmodel.ops.OP_DIMS``: ``rms_norm`` reads only d_model), each knot's model
cost is multiplied by the measured/model ratio interpolated in log batch size between that
shape's points (held at the end ratio beyond them), so the curve passes through every measured
point and the model only carries the shape between them. For ``costmodel.ops.ONE_TOKEN_OPS`` a ratio
measured at one token serves one token only: on the H100's committed held-out reports, carrying it to
2-3 tokens made the modelled shapes' latency +3.5% high (median signed) against +2.2% without, and the
bias moved toward zero in five of six reports (chosen on those reports, so not a blind result; the
2026-12-07e check then tested it blind). At other shapes the model is corrected by the measured
shapes' ratios at the same batch size, averaged with weights 1 / distance² in log2 of
the dims the op reads (``SHAPE_WEIGHT_POWER``): what the tile model misses at the nearest measured
shapes (a config's real efficiency, L2 residency) it likely misses nearby too. A shape the sweep timed
without energy windows (``calibration.sweep.LATENCY_SHAPES``) takes its own latency ratios and the
energy ratios a modelled shape there would borrow. On the H100's six
earlier held-out reports this took the modelled shapes' median latency error from 9.0% to 6.8%
and energy from 6.4% to 5.0% (README, cost model).
Every path (``KernelCostModel.get_cost``, ``DeviceCostTable``, the router's bias kernels)
interpolates these same knots, log-log.
"""
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from costmodel.fit import Ceilings, OpFit, fit_op, launch_times, work_totals
from costmodel.ops import ONE_TOKEN_OPS, SEQUENCE_OPS, ModelDims, op_shape, work
from costmodel.shapes import op_launches

TOKEN_KNOTS = tuple(sorted({round(2 ** (k / 4)) for k in range(0, 57)}))  # 1 .. 16384 tokens, 4 a doubling
SEQUENCE_KNOTS = tuple(sorted({round(2 ** (k / 4)) for k in range(0, 33)}))  # 1 .. 256 sequences
STEP_SCAN = {"tokens": tuple(range(1, 257)) + tuple(range(272, 4097, 16)) + tuple(range(4224, 16385, 128)),
             "sequences": tuple(range(1, 257))}  # where steps are looked for; bisected down to one integer
MIN_STEP = 0.02  # a rise of more than 2% from one batch size to the next is a step
MAX_STEPS = 12  # the largest steps get knots (two each): the device kernels walk every knot
SHAPE_WEIGHT_POWER = 2  # a measured shape's weight at a modelled one: 1 / (log2 distance) ** 2
THIN_TOLERANCE = 0.005  # a knot is dropped when the log-log chord around it stays within 0.5% of every dropped knot
# ops that run one kernel (our Triton GEMM, ``kernels.matmul``, alone or twice; the FP8 experts): one energy
# fit over all their metered points. Fitted alone, each op's three or four metered shapes split a byte's joules
# between the L2 and HBM terms as they happened to fall (the H100 table's ffn_gate priced an L2 byte at 10 pJ,
# its swiglu_gate_up at 73 pJ); pooled, the modelled shapes' energy p90 in the replay of the H100's committed
# reports went from 12.0% to 11.6% (chosen on them, not blind).
ENERGY_POOLS = (("ffn_gate", "ffn_up", "ffn_down", "swiglu_gate_up", "swiglu_ffn", "qkv_projection",
                 "output_projection", "lm_head"), ("fused_experts_fp8", "expert_ffn_fp8"))
_FITS = {}  # (op, its pool's points, dims, configs, ceilings) -> OpFit: a table loaded again is not fitted again


@dataclass(frozen=True)
class Curve:
    """Knots of one op at one shape, sorted by batch size; ``measured_batches`` are the batch sizes
    the table measured at this shape (empty: the shape is modelled), ``metered_batches`` those of
    them with a measured energy (the others were timed only)."""
    batch_size: tuple
    latency_ms: tuple
    energy_j: tuple
    memory_gb: tuple
    measured_batches: tuple
    metered_batches: tuple

    def at(self, batch_size: float) -> tuple:
        """(latency_ms, energy_j, memory_gb) at ``batch_size`` (> 0), log-log between the knots."""
        return tuple(log_log_at(self.batch_size, ys, batch_size) for ys in (self.latency_ms, self.energy_j,
                                                                            self.memory_gb))


def point_dims(table: dict, point: dict) -> ModelDims:
    """The dims a table point was measured at: its own ``dims``, else the table's."""
    return ModelDims(**(point.get("dims") or table["dims"]))


def log_log_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """ys(x) on the polyline through the sorted knots (xs, ys) in log-log space, extending its end
    segments: how every path reads a curve between its knots."""
    i = min(max(next((n for n, v in enumerate(xs) if v > x), len(xs)) - 1, 0), len(xs) - 2)
    slope = (math.log(ys[i + 1]) - math.log(ys[i])) / (math.log(xs[i + 1]) - math.log(xs[i]))
    return math.exp(math.log(ys[i]) + slope * (math.log(x) - math.log(xs[i])))


def _lerp_flat(xs, ys, x):
    """Piecewise-linear ys(x) through sorted ``xs``, held at the end values beyond them."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = next(n for n, v in enumerate(xs) if v >= x)
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


class ShapeModel:
    """The fitted tile model of a checked table (``costmodel.table.check_table``)."""

    def __init__(self, table: dict):
        self.table = table
        self.configs = table.get("kernel_configs")
        self.ceilings = Ceilings(table["peak_flops"], table["hbm_bytes_per_s"], table.get("sm_count"),
                                 table.get("l2_cache_bytes"))
        self._fits, self._curves = {}, {}

    def _times(self, op, batch_size, dims):
        launches = op_launches(op, batch_size, dims, self.configs)
        return [launch_times(l, self.ceilings) for l in launches], work_totals(launches)

    def fit(self, op: str) -> OpFit:
        """The op's ``OpFit`` (fitted on first use): its latency over its own points, its energy over
        the metered points of every op of its ``ENERGY_POOLS`` pool."""
        if op not in self._fits:
            pool = [o for o in energy_pool(op) if o in self.table["ops"]]
            points = {o: self.table["ops"][o]["points"] for o in pool}
            key = (op, json.dumps([points, self.table["dims"], self.configs], sort_keys=True), self.ceilings)
            if key not in _FITS:
                rows = {o: self._fit_rows(o) for o in pool}
                _FITS[key] = fit_op(rows[op], [row for pool_rows in rows.values() for row in pool_rows])
            self._fits[op] = _FITS[key]
        return self._fits[op]

    def _fit_rows(self, op):
        """(latency_ms, energy_j or None, launch times, work totals) of each of the op's points."""
        rows = []
        for p in self.table["ops"][op]["points"]:
            times, totals = self._times(op, p["batch_size"], point_dims(self.table, p))
            rows.append((p["latency_ms"], p.get("energy_j"), times, totals))
        return rows

    def model_cost(self, op: str, batch_size: float, dims: ModelDims, latency_ms: "float | None" = None) -> tuple:
        """(latency_ms, energy_j) of the bare model; energy at ``latency_ms`` (ms) when given."""
        fit = self.fit(op)
        times, totals = self._times(op, batch_size, dims)
        latency_ms = fit.latency_ms(times) if latency_ms is None else latency_ms
        return latency_ms, fit.energy_j(latency_ms, times, totals)

    def _points_by_shape(self, op):
        """{op shape: (the dims of its first point, its points)} over the op's points (``op_shape``: dims
        that agree on every dim the op reads are one shape)."""
        shapes = {}
        for p in self.table["ops"][op]["points"]:
            dims = point_dims(self.table, p)
            shapes.setdefault(op_shape(op, dims), (dims, []))[1].append(p)
        return shapes

    def _same_shape_points(self, op, dims):
        """The op's points measured at ``dims``'s op shape."""
        return self._points_by_shape(op).get(op_shape(op, dims), (dims, []))[1]

    def _shape_residuals(self, op, dims, points):
        """(log b, log latency ratio) and (log b, log energy ratio) of ``points``, measured at ``dims``'s
        op shape; ratios at one batch size measured more than once averaged."""
        latency, energy = {}, {}
        for p in points:
            log_b = math.log(p["batch_size"])
            model_ms, _ = self.model_cost(op, p["batch_size"], dims)
            latency.setdefault(log_b, []).append(math.log(p["latency_ms"] / model_ms))
            if p.get("energy_j") is not None:
                _, model_j = self.model_cost(op, p["batch_size"], dims, latency_ms=p["latency_ms"])
                energy.setdefault(log_b, []).append(math.log(p["energy_j"] / model_j))
        return ([(x, sum(ys) / len(ys)) for x, ys in sorted(ratios.items())] for ratios in (latency, energy))

    def _nearby_residuals(self, op, dims):
        """``_shape_residuals`` at an op shape no point has: at every batch size any measured shape has
        a ratio for, the mean of each measured shape's ratio there (``_correction``) weighted by distance
        (module docstring)."""
        target = [math.log2(v) for v in op_shape(op, dims)]
        weighted = []  # (weight, latency residuals, energy residuals) of each measured shape
        for shape, (shape_dims, points) in self._points_by_shape(op).items():
            if shape == op_shape(op, dims):
                continue
            distance = math.dist(target, [math.log2(v) for v in shape])
            weighted.append((distance ** -SHAPE_WEIGHT_POWER, *self._shape_residuals(op, shape_dims, points)))
        blended = []
        for column in (1, 2):
            with_ratios = [(w[0], w[column]) for w in weighted if w[column]]
            log_bs = sorted({x for _, residuals in with_ratios for x, _ in residuals})
            total = sum(weight for weight, _ in with_ratios)
            blended.append([(x, sum(weight * _correction(residuals, math.exp(x), op in ONE_TOKEN_OPS)
                                    for weight, residuals in with_ratios) / total) for x in log_bs])
        return blended

    def curve(self, op: str, dims: ModelDims) -> Curve:
        """The op's ``Curve`` at ``dims`` (cached)."""
        key = (op, dims)
        if key not in self._curves:
            self._curves[key] = self._build_curve(op, dims)
        return self._curves[key]

    def _build_curve(self, op, dims):
        points = self._same_shape_points(op, dims)
        latency_res, energy_res = (self._shape_residuals(op, dims, points) if points
                                   else self._nearby_residuals(op, dims))
        if points and not energy_res:  # a shape timed without energy windows: its energy is modelled
            energy_res = self._nearby_residuals(op, dims)[1]
        measured = tuple(sorted({p["batch_size"] for p in points}))
        metered = tuple(sorted({p["batch_size"] for p in points if p.get("energy_j") is not None}))
        knots = set(SEQUENCE_KNOTS if op in SEQUENCE_OPS else TOKEN_KNOTS)
        knots = sorted(knots | set(measured) | self._step_knots(op, dims))
        rows, one_token_apart = [], op in ONE_TOKEN_OPS
        for b in knots:
            model_ms, _ = self.model_cost(op, b, dims)
            latency_ms = model_ms * math.exp(_correction(latency_res, b, one_token_apart))
            _, model_j = self.model_cost(op, b, dims, latency_ms=latency_ms)
            rows.append((b, latency_ms, model_j * math.exp(_correction(energy_res, b, one_token_apart)),
                         work(op, b, dims)[1] / 1e9))
        rows = _thinned(rows, keep=set(measured))
        return Curve(*(tuple(col) for col in zip(*rows)), measured_batches=measured, metered_batches=metered)

    def _step_knots(self, op, dims):
        """{b, b + 1} for the ``MAX_STEPS`` largest steps of the model's latency between
        neighbouring batch sizes (a rise over ``MIN_STEP``), found on ``STEP_SCAN`` and bisected."""
        def latency(b: int) -> float:
            return self.model_cost(op, b, dims)[0]
        scan = STEP_SCAN["sequences" if op in SEQUENCE_OPS else "tokens"]
        values = [latency(b) for b in scan]
        steps = []
        for (lo, y_lo), (hi, y_hi) in zip(zip(scan, values), zip(scan[1:], values[1:])):
            if y_hi / y_lo - 1 <= MIN_STEP:
                continue
            while hi - lo > 1:  # keep the half that rises more: it holds the step, if there is one
                mid = (lo + hi) // 2
                y_mid = latency(mid)
                lo, y_lo, hi, y_hi = (lo, y_lo, mid, y_mid) if y_mid / y_lo >= y_hi / y_mid else (mid, y_mid, hi, y_hi)
            if y_hi / y_lo - 1 > MIN_STEP:
                steps.append((y_hi / y_lo, lo))
        return {b for _, lo in sorted(steps, reverse=True)[:MAX_STEPS] for b in (lo, lo + 1)}

    def measured_shapes(self, op: str) -> list:
        """The dims at which the table measured ``op``, as dicts."""
        shapes = {point_dims(self.table, p) for p in self.table["ops"][op]["points"]}
        return [asdict(d) for d in sorted(shapes, key=lambda d: tuple(asdict(d).values()))]


def energy_pool(op: str) -> tuple:
    """The ops whose metered points fit ``op``'s energy constants: its ``ENERGY_POOLS`` pool, or itself."""
    return next((pool for pool in ENERGY_POOLS if op in pool), (op,))


def _within(rows, i, j):
    """Do the log-log chords from knot i to knot j pass within ``THIN_TOLERANCE`` of every knot between?"""
    xs = [rows[i][0], rows[j][0]]
    for k in range(i + 1, j):
        for col in (1, 2):  # latency and energy: what the devices read (memory is linear in b)
            if abs(log_log_at(xs, [rows[i][col], rows[j][col]], rows[k][0]) / rows[k][col] - 1) > THIN_TOLERANCE:
                return False
    return True


def _thinned(rows, keep):
    """The knots ``rows`` (sorted (b, latency, energy, memory)) with every one dropped that the
    chord of its neighbours predicts within ``THIN_TOLERANCE`` (greedy, from the smallest batch),
    never the first, the last or those at the batch sizes ``keep``: the device kernels walk every
    knot, so a smooth stretch costs one segment, not eight."""
    kept, i = [0], 0
    while i < len(rows) - 1:
        j = i + 1
        while j + 1 < len(rows) and rows[j][0] not in keep and _within(rows, i, j + 1):
            j += 1
        kept.append(j)
        i = j
    return [rows[k] for k in kept]


def _correction(residuals, batch_size, one_token_apart=False):
    """The log measured/model ratio at ``batch_size`` (0 without measured points at the shape); with
    ``one_token_apart``, a ratio at one token (log b = 0) serves no other batch size where there are others."""
    if one_token_apart and batch_size > 1 and len(residuals) > 1 and residuals[0][0] == 0.0:
        residuals = residuals[1:]
    if not residuals:
        return 0.0
    return _lerp_flat([x for x, _ in residuals], [y for _, y in residuals], math.log(batch_size))
