"""The shape-general cost of an op: a tile model fitted to the table's measured points.

For each launch (``costmodel.shapes.Launch``) the model takes times at the table's measured
ceilings (``peak_flops``, ``hbm_bytes_per_s``) and the card's SM count and L2 size:

    waves     = ceil(tiles / sm_count)
    compute_s = waves * tile_flops / (peak_flops / sm_count)
    l2_s      = min(nbytes, l2_bytes) / hbm_bytes_per_s      (what a repeated call finds in L2)
    hbm_s     = max(nbytes - l2_bytes, 0) / hbm_bytes_per_s  (what streams from HBM)

and predicts, with constants fitted per op,

    latency_ms = fixed_ms + sum over launches of
                 max(compute_s / compute_eff + waves * tile_ms, l2_s / l2_eff + hbm_s / hbm_eff)
    energy_j   = power_w * latency_s + j_per_flop * padded FLOPs + j_per_byte * bytes

``fixed_ms`` is the launch time a graph replay still pays; ``tile_ms`` a tile's prologue and
epilogue (which short K loops cannot hide: why small GEMMs reach a small share of the ceiling);
the efficiencies are the share of the ceilings our tiles reach. ``l2_eff`` may exceed 1 (L2
outruns HBM); where no point's working set exceeds L2 the table cannot tell ``hbm_eff``, which
then takes the prior ``HBM_EFF_PRIOR`` (``OpFit.hbm_eff_source`` says which). ``power_w`` is the
board's power while the kernel runs (static power and clocks held up), the two ``j_per_*`` the
dynamic energy of the work. Both fits minimise squared *relative* error,
since costs span four decades: latency by a grid search over the efficiencies (``fixed_ms`` in
closed form), energy by non-negative least squares at each point's measured latency. Waves make
the latency step where the tile count crosses a multiple of the SM count, and the config switch
(``costmodel.shapes.pick_config``) where the kernel changes tile size.
"""
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from costmodel.shapes import Launch

COMPUTE_EFF_GRID = tuple(0.05 * 20.0 ** (i / 19) for i in range(20))  # 0.05 .. 1 of the matmul ceiling
MEMORY_EFF_GRID = tuple(0.05 * 80.0 ** (i / 19) for i in range(20))  # 0.05 .. 4 of the copy ceiling (L2: > 1)
HBM_EFF_GRID = tuple(e for e in MEMORY_EFF_GRID if e <= 1.2)
TILE_MS_GRID = (0.0,) + tuple(1e-4 * 100.0 ** (i / 11) for i in range(12))  # 0, 0.1 .. 10 µs per wave
PARAM_LOW = (0.02, 0.0, 0.02, 0.02)  # compute_eff, tile_ms, l2_eff, hbm_eff: where the search may go
PARAM_HIGH = (1.0, 0.01, 8.0, 1.2)  # never faster than the measured matmul ceiling, nor 1.2x the copy ceiling
HBM_EFF_PRIOR = 0.9  # share of the copy ceiling a streaming kernel reaches, where the table cannot tell


@dataclass(frozen=True)
class Ceilings:
    """The table's measured ceilings, SM count and L2 bytes (None: tiles are not quantised into
    waves; no L2: every byte streams from HBM)."""
    peak_flops: float
    hbm_bytes_per_s: float
    sm_count: int = None
    l2_bytes: int = None


def launch_times(launch: Launch, ceilings: Ceilings) -> tuple:
    """(compute_s, waves, l2_s, hbm_s) of one launch at the ceilings (module docstring)."""
    if ceilings.sm_count:
        waves = math.ceil(launch.tiles / ceilings.sm_count)
        compute_s = waves * launch.tile_flops * ceilings.sm_count / ceilings.peak_flops
    else:
        waves = launch.tiles
        compute_s = launch.tiles * launch.tile_flops / ceilings.peak_flops
    in_l2 = min(launch.nbytes, ceilings.l2_bytes or 0)
    return compute_s, waves, in_l2 / ceilings.hbm_bytes_per_s, (launch.nbytes - in_l2) / ceilings.hbm_bytes_per_s


def work_totals(launches: Sequence[Launch]) -> tuple:
    """(padded FLOPs, bytes) over an op's launches."""
    return sum(l.tiles * l.tile_flops for l in launches), sum(l.nbytes for l in launches)


@dataclass(frozen=True)
class OpFit:
    """The fitted constants of one op (module docstring), and the fit's own relative RMS errors."""
    fixed_ms: float
    compute_eff: float
    tile_ms: float
    l2_eff: float
    hbm_eff: float
    hbm_eff_source: str  # "fitted", or "prior" where no point streamed from HBM
    power_w: float
    j_per_flop: float
    j_per_byte: float
    latency_rms: float
    energy_rms: float  # None when no point has a measured energy

    def latency_ms(self, times: Sequence[tuple]) -> float:
        """Predicted latency from each launch's ``launch_times``."""
        return self.fixed_ms + _span_ms(times, (self.compute_eff, self.tile_ms, self.l2_eff, self.hbm_eff))

    def energy_j(self, latency_ms: float, flops: float, nbytes: float) -> float:
        return self.power_w * latency_ms * 1e-3 + self.j_per_flop * flops + self.j_per_byte * nbytes


def _span_ms(times, params):
    """The launches' time beyond ``fixed_ms`` at ``params`` = (compute_eff, tile_ms, l2_eff, hbm_eff)."""
    compute_eff, tile_ms, l2_eff, hbm_eff = params
    return sum(max(1e3 * c / compute_eff + w * tile_ms, 1e3 * (l2 / l2_eff + hbm / hbm_eff)) for c, w, l2, hbm in times)


def _losses(latency_ms, times, params):
    """(loss [G], fixed_ms [G]) of G parameter sets [G, 4] on rows of measured ``latency_ms`` [R]
    and launch ``times`` [4, R, L] (compute_s, waves, l2_s, hbm_s; absent launches all zero)."""
    c, w, l2, hbm = (t[None] for t in times)  # [1, R, L]
    p = params[:, :, None, None]  # [G, 4, 1, 1]
    spans = np.maximum(1e3 * c / p[:, 0] + w * p[:, 1], 1e3 * (l2 / p[:, 2] + hbm / p[:, 3])).sum(-1)  # [G, R]
    weights = 1.0 / latency_ms ** 2
    fixed_ms = np.maximum(((latency_ms - spans) * weights).sum(-1) / weights.sum(), 0.0)
    return (((fixed_ms[:, None] + spans - latency_ms) ** 2) * weights).sum(-1), fixed_ms


def fit_latency(rows: Sequence[tuple]) -> tuple:
    """(fixed_ms, compute_eff, tile_ms, l2_eff, hbm_eff, hbm_eff_source, relative RMS): a grid
    search, then a pattern search from its best (every constant scaled up, down or kept, by a
    factor that shrinks once no move helps)."""
    latency_ms = np.array([y for y, _ in rows])
    width = max(len(times) for _, times in rows)
    times = np.zeros((4, len(rows), width))
    for r, (_, launch_times_) in enumerate(rows):
        for l, values in enumerate(launch_times_):
            times[:, r, l] = values
    streams = bool((times[3] > 0).any())
    hbm_grid = HBM_EFF_GRID if streams else (HBM_EFF_PRIOR,)
    grid = np.array(list(itertools.product(COMPUTE_EFF_GRID, TILE_MS_GRID, MEMORY_EFF_GRID, hbm_grid)))
    losses, _ = _losses(latency_ms, times, grid)
    best, loss = grid[losses.argmin()], losses.min()
    factor = 1.3
    while factor > 1.0005:
        scales = np.array(list(itertools.product((1 / factor, 1.0, factor), repeat=4 if streams else 3)))
        if not streams:
            scales = np.concatenate([scales, np.ones((len(scales), 1))], axis=1)
        trials = best * scales
        trials[:, 1] = np.where(best[1] > 0, trials[:, 1], scales[:, 1] * TILE_MS_GRID[1] / 10 * (scales[:, 1] > 1))
        trials = np.clip(trials, PARAM_LOW, PARAM_HIGH)
        trial_losses, _ = _losses(latency_ms, times, trials)
        if trial_losses.min() < loss:
            best, loss = trials[trial_losses.argmin()], trial_losses.min()
        else:
            factor = math.sqrt(factor)
    fixed_ms = float(_losses(latency_ms, times, best[None])[1][0])
    return (fixed_ms, *map(float, best), "fitted" if streams else "prior", math.sqrt(loss / len(rows)))


def fit_energy(rows: Sequence[tuple]) -> tuple:
    """(power_w, j_per_flop, j_per_byte, relative RMS): non-negative least squares over rows of
    (energy_j, latency_s, flops, bytes), each row scaled by 1 / energy_j and each column by its
    RMS (the three differ by 15 decades). Every subset of the three terms is solved and the best
    non-negative solution kept (three terms: seven subsets)."""
    raw = [[t / e, f / e, b / e] for e, t, f, b in rows]
    scale = [math.sqrt(sum(x[i] ** 2 for x in raw) / len(raw)) or 1.0 for i in range(3)]
    scaled = [[v / s for v, s in zip(x, scale)] for x in raw]
    best = (math.inf, (0.0, 0.0, 0.0))
    for size in (1, 2, 3):
        for subset in itertools.combinations(range(3), size):
            columns = np.array([[x[i] for i in subset] for x in scaled])  # [rows, terms]
            solution, _, rank, _ = np.linalg.lstsq(columns, np.ones(len(scaled)), rcond=None)
            if rank < len(subset) or solution.min() < 0:  # collinear terms, or a negative one
                continue
            coeffs = [0.0, 0.0, 0.0]
            for i, value in zip(subset, solution):
                coeffs[i] = float(value)
            loss = sum((sum(c * v for c, v in zip(coeffs, x)) - 1.0) ** 2 for x in scaled)
            best = min(best, (loss, tuple(coeffs)))
    loss, coeffs = best
    return (*(c / s for c, s in zip(coeffs, scale)), math.sqrt(loss / len(rows)))


def fit_op(points: Sequence[tuple]) -> OpFit:
    """An ``OpFit`` from points of (latency_ms, energy_j or None, launch times, (flops, bytes))."""
    *latency_fit, latency_rms = fit_latency([(p[0], p[2]) for p in points])
    energy_rows = [(e, t * 1e-3, flops, nbytes) for t, e, _, (flops, nbytes) in points if e is not None]
    power_w, j_per_flop, j_per_byte, energy_rms = fit_energy(energy_rows) if energy_rows else (0.0, 0.0, 0.0, None)
    return OpFit(*latency_fit, power_w, j_per_flop, j_per_byte, latency_rms, energy_rms)
