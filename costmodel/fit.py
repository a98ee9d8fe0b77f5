"""The shape-general cost of an op: a tile model fitted to the table's measured points.

For each launch (``costmodel.shapes.Launch``) the model takes times at the table's measured
ceilings (``peak_flops``, ``hbm_bytes_per_s``) and the card's SM count and L2 size:

    waves     = ceil(tiles / sm_count)
    compute_s = waves * tile_flops / (peak_flops / sm_count)
    bytes_s   = nbytes / hbm_bytes_per_s                     (all the launch's bytes at the copy ceiling)
    l2_s      = resident * bytes_s                           (what a repeated call finds in L2)
    hbm_s     = bytes_s - l2_s                               (what streams from HBM)
    stream_s  = ceil(tiles / (sm_count * resident)) * tile_bytes / (hbm_bytes_per_s / sm_count)
                                                             (one SM's fair share, per tile in turn)

and predicts, with constants fitted per op (the energy ones per kernel, ``costmodel.curves.ENERGY_POOLS``),

    latency_ms = fixed_ms + sum over launches of
                 max(compute_s / compute_eff + waves * tile_ms, l2_s / l2_eff + hbm_s / hbm_eff,
                     stream_s / stream_eff)
    energy_j   = power_w * latency_s + j_per_flop * padded FLOPs + j_per_byte * bytes
                 + j_per_tile_byte * tile bytes (summed over the tiles: what moves between L2 and the SMs)
                 + hbm_stream_w * hbm_s (the bytes that stream from HBM, as seconds at the copy ceiling)

``fixed_ms`` is the launch time a graph replay still pays; ``tile_ms`` a tile's prologue and
epilogue (which short K loops cannot hide: why small GEMMs reach a small share of the ceiling);
the efficiencies are the share of the ceilings our tiles reach. ``stream_s`` bounds a launch of
few, long tiles (decode GEMMs: 12 tiles of a 2048-long K loop): each SM moves its own tile's bytes
at ``stream_eff`` times its fair share of the copy ceiling, however idle the other SMs are; an SM
that holds ``resident`` programs at once (a norm's rows) streams them side by side.
``resident`` is the share of its bytes a repeated call finds in L2 (``l2_resident_share``), set by
the whole op's working set (every launch's bytes) against the L2 size: all of them while the working
set fits ``L2_HIT_BELOW`` of L2, none beyond ``L2_MISS_ABOVE`` (a cyclic sweep larger than what L2
keeps evicts each line before its next use), linear between. These are priors, not fitted: the sweep's
working sets sit well inside L2 or well beyond it. They come from the H100's committed held-out
reports, whose one-to-four-token GEMMs at the same working set ran at 3.5 TB/s and 119 pJ a byte at
39.4 MB (0.75 of the 50 MiB L2), and at 2.5 TB/s and 190 pJ a byte at 42.5 MB (0.81). The model it
replaced kept a fixed half of L2 for every working set: it spread that cliff over 25-50 MB, priced the
L2-resident weights of 25-40 MB shapes as streaming (their energy 30-55% high), and let the launches of
a two-launch op each fit L2 when together they do not (``swiglu_ffn``'s energy 20-29% low). In the
replay of those reports (``bench.kcm_replay``) the modelled shapes' energy p90 went from 17.2% to 12.0%
(so chosen on them, not blind), and moving either edge by 0.05 moved it by under 0.6 points.
``l2_eff`` may exceed 1 (L2 outruns HBM);
where no point's working set exceeds L2 the table cannot tell ``hbm_eff``, which then takes the prior ``HBM_EFF_PRIOR``
(``OpFit.hbm_eff_source`` says which). ``power_w`` is the board's power while the kernel runs
(static power and clocks held up), the ``j_per_*`` terms the dynamic energy of the work, and
``hbm_stream_w`` what reading from HBM adds over reading from L2 (a weight that outgrows L2 costs
about twice the joules a byte of one that a repeated call finds there). Both
fits minimise squared *relative* error, since costs span four decades: latency by a grid search
over the efficiencies (``fixed_ms`` in closed form), energy by non-negative least squares at each
point's measured latency. Waves make the latency step where the tile count crosses a multiple of
the SM count (not where an expected tile count does: the fused experts' waves over routed row
blocks are fractional, ``Launch.routed``), and the config switch (``costmodel.shapes.pick_config``)
where the kernel changes tile size.
"""
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from costmodel.shapes import Launch

# the grid is coarse (the pattern search refines its best): 6 x 5 x 7 x 5 x 6 points
COMPUTE_EFF_GRID = tuple(0.05 * 20.0 ** (i / 5) for i in range(6))  # 0.05 .. 1 of the matmul ceiling
MEMORY_EFF_GRID = tuple(0.05 * 80.0 ** (i / 6) for i in range(7))  # 0.05 .. 4 of the copy ceiling (L2: > 1)
HBM_EFF_GRID = tuple(e for e in MEMORY_EFF_GRID if e <= 1.2)
TILE_MS_GRID = (0.0,) + tuple(1e-4 * 100.0 ** (i / 3) for i in range(4))  # 0, 0.1 .. 10 µs per wave
STREAM_EFF_GRID = tuple(0.1 * 100.0 ** (i / 5) for i in range(6))  # 0.1 .. 10 of an SM's fair share
L2_HIT_BELOW, L2_MISS_ABOVE = 0.75, 0.8  # shares of L2 (module docstring): priors, not fitted
SEARCH_STARTS = 6  # grid points the pattern search refines
# compute_eff, tile_ms, l2_eff, hbm_eff, stream_eff: where the search may go; never faster than the
# measured matmul ceiling, nor 1.2x the copy ceiling
PARAM_LOW = (0.02, 0.0, 0.02, 0.02, 0.02)
PARAM_HIGH = (1.0, 0.01, 8.0, 1.2, 40.0)
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
    """(compute_s, waves, bytes_s, l2_bytes_s, stream_s) of one launch at the ceilings (module
    docstring; ``l2_bytes_s`` is the whole L2 at the copy ceiling, which ``l2_resident_share`` reads)."""
    if ceilings.sm_count:
        waves = _waves(launch.tiles, ceilings.sm_count, launch.routed)
        compute_s = waves * launch.tile_flops * ceilings.sm_count / ceilings.peak_flops
        stream_waves = _waves(launch.tiles, ceilings.sm_count * launch.resident, launch.routed)
        stream_s = stream_waves * launch.tile_bytes * ceilings.sm_count / ceilings.hbm_bytes_per_s
    else:  # no SM count: tiles are not quantised, and no tile is bound to one SM
        waves, stream_s = launch.tiles, 0.0
        compute_s = launch.tiles * launch.tile_flops / ceilings.peak_flops
    return (compute_s, waves, launch.nbytes / ceilings.hbm_bytes_per_s,
            (ceilings.l2_bytes or 0) / ceilings.hbm_bytes_per_s, stream_s)


def _waves(tiles, per_wave, routed):
    """Waves of ``tiles`` programs, ``per_wave`` at once: whole, or for tiles expected over the
    routing (``Launch.routed``) their expectation's share, at least one."""
    if not routed or not tiles:
        return math.ceil(tiles / per_wave)
    return max(tiles / per_wave, 1.0)


def work_totals(launches: Sequence[Launch]) -> tuple:
    """(padded FLOPs, bytes, tile bytes) over an op's launches: tile bytes count every tile's own
    loads and stores, the traffic between L2 and the SMs (a weight tile read by three row blocks counts thrice)."""
    return (sum(l.tiles * l.tile_flops for l in launches), sum(l.nbytes for l in launches),
            sum(l.tiles * l.tile_bytes for l in launches))


@dataclass(frozen=True)
class OpFit:
    """The fitted constants of one op (module docstring), and the fit's own relative RMS errors."""
    fixed_ms: float
    compute_eff: float
    tile_ms: float
    l2_eff: float
    hbm_eff: float
    stream_eff: float
    hbm_eff_source: str  # "fitted", or "prior" where no point streamed from HBM
    power_w: float
    j_per_flop: float
    j_per_byte: float
    j_per_tile_byte: float
    hbm_stream_w: float
    latency_rms: float
    energy_rms: float  # None when no point has a measured energy

    def latency_ms(self, times: Sequence[tuple]) -> float:
        """Predicted latency from each launch's ``launch_times``."""
        params = (self.compute_eff, self.tile_ms, self.l2_eff, self.hbm_eff, self.stream_eff)
        return self.fixed_ms + _span_ms(times, params)

    def energy_j(self, latency_ms: float, times: Sequence[tuple], totals: tuple) -> float:
        """Predicted energy at ``latency_ms`` of launches with ``launch_times`` ``times`` and
        ``work_totals`` ``totals``."""
        flops, nbytes, tile_bytes = totals
        return (self.power_w * latency_ms * 1e-3 + self.j_per_flop * flops + self.j_per_byte * nbytes
                + self.j_per_tile_byte * tile_bytes + self.hbm_stream_w * hbm_seconds(times))


def hbm_seconds(times: Sequence[tuple]) -> float:
    """The bytes a repeated call of launches with ``launch_times`` ``times`` streams from HBM, as
    seconds at the copy ceiling."""
    if not times:
        return 0.0
    working_set_s = sum(t[2] for t in times)
    return working_set_s * (1.0 - float(l2_resident_share(working_set_s, times[0][3])))


def l2_resident_share(working_set_s: "float | np.ndarray", l2_s: "float | np.ndarray") -> "float | np.ndarray":
    """The share of a repeated call's bytes found in L2 (module docstring), from its working set and
    the L2 size, both as seconds at the copy ceiling (numbers or broadcasting arrays); 0 without an L2."""
    working_set_s, l2_s = np.asarray(working_set_s, dtype=float), np.asarray(l2_s, dtype=float)
    edge_s = np.where(l2_s > 0, (L2_MISS_ABOVE - L2_HIT_BELOW) * l2_s, 1.0)
    return np.where(l2_s > 0, np.clip((L2_MISS_ABOVE * l2_s - working_set_s) / edge_s, 0.0, 1.0), 0.0)


def _span_ms(times, params):
    """The launches' time beyond ``fixed_ms`` at ``params`` (``PARAM_LOW``'s order)."""
    spans = _spans(np.array(times, dtype=float).T[:, None, :], np.array(params, dtype=float)[None])  # [1, 1]
    return float(spans[0, 0])


def _spans(times, params):
    """[G, R] time beyond ``fixed_ms`` of G parameter sets [G, 5] on R rows of launch ``times``
    [5, R, L] (``launch_times``'s fields; absent launches all zero)."""
    c, w, nbytes, l2_cap, stream = (t[None] for t in times)  # [1, R, L]
    p = params[:, :, None, None]  # [G, 5, 1, 1]
    in_l2 = nbytes * l2_resident_share(nbytes.sum(-1, keepdims=True), l2_cap)  # the op's working set decides
    memory = in_l2 / p[:, 2] + (nbytes - in_l2) / p[:, 3]
    return 1e3 * np.maximum(np.maximum(c / p[:, 0] + w * p[:, 1] * 1e-3, memory), stream / p[:, 4]).sum(-1)


def _losses(latency_ms, times, params):
    """(loss [G], fixed_ms [G]) of G parameter sets [G, 5] on rows of measured ``latency_ms`` [R]
    and launch ``times`` [5, R, L]."""
    spans = _spans(times, params)
    weights = 1.0 / latency_ms ** 2
    fixed_ms = np.maximum(((latency_ms - spans) * weights).sum(-1) / weights.sum(), 0.0)
    return (((fixed_ms[:, None] + spans - latency_ms) ** 2) * weights).sum(-1), fixed_ms


def fit_latency(rows: Sequence[tuple]) -> tuple:
    """(fixed_ms, compute_eff, tile_ms, l2_eff, hbm_eff, stream_eff, hbm_eff_source, relative RMS): a grid
    search, then a pattern search from its best points (``_search_starts``; one or two constants scaled up
    or down by a factor that shrinks once no move helps)."""
    latency_ms = np.array([y for y, _ in rows])
    width = max(len(times) for _, times in rows)
    times = np.zeros((5, len(rows), width))
    for r, (_, launch_times_) in enumerate(rows):
        for l, values in enumerate(launch_times_):
            times[:, r, l] = values
    streams = bool((l2_resident_share(times[2].sum(-1), times[3].max(-1)) < 1).any())  # some point outgrows L2
    hbm_grid = HBM_EFF_GRID if streams else (HBM_EFF_PRIOR,)
    axes = (COMPUTE_EFF_GRID, TILE_MS_GRID, MEMORY_EFF_GRID, hbm_grid, STREAM_EFF_GRID)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    losses, _ = _losses(latency_ms, times, grid)
    moves = _moves([i for i in range(len(axes)) if streams or i != 3])  # the HBM prior stays put
    # the grid is coarse and the loss has several valleys: refine the best few grid points
    best, loss = min((_pattern_search(latency_ms, times, grid[i], losses[i], moves)
                      for i in _search_starts(grid, losses)), key=lambda found: found[1])
    fixed_ms = float(_losses(latency_ms, times, best[None])[1][0])
    return (fixed_ms, *map(float, best), "fitted" if streams else "prior", math.sqrt(loss / len(rows)))


def _search_starts(grid, losses):
    """The grid points the pattern search refines: the ``SEARCH_STARTS`` best, and the best at each
    grid value of ``stream_eff``. Where few points are bound by L2, decode points are bound by the
    stream or by memory, and the loss has a valley for each ``stream_eff`` (a synthetic table at the
    sweep's shapes: the best six grid points all led to 11 instead of 6, 5% off at a held-out shape)."""
    order = np.argsort(losses)
    per_stream_eff = [order[grid[order, 4] == value][0] for value in np.unique(grid[:, 4])]
    return list(dict.fromkeys([*order[:SEARCH_STARTS], *per_stream_eff]))


def _pattern_search(latency_ms, times, best, loss, moves):
    """(params, loss) from ``best``: the best of ``moves`` scaling it by ``factor``, taken while it
    helps; then ``factor`` shrinks, down to 1.0005."""
    factor = 1.3
    while factor > 1.0005:
        scales = factor ** moves
        trials = best * scales
        trials[:, 1] = np.where(best[1] > 0, trials[:, 1], scales[:, 1] * TILE_MS_GRID[1] / 10 * (scales[:, 1] > 1))
        trials = np.clip(trials, PARAM_LOW, PARAM_HIGH)
        trial_losses, _ = _losses(latency_ms, times, trials)
        if trial_losses.min() < loss:
            best, loss = trials[trial_losses.argmin()], trial_losses.min()
        else:
            factor = math.sqrt(factor)
    return best, loss


def _moves(moving):
    """[M, 5] exponents of the pattern search's moves: each of the ``moving`` constants, or two of
    them, up or down one factor."""
    moves = []
    for size in (1, 2):
        for axes in itertools.combinations(moving, size):
            for signs in itertools.product((-1.0, 1.0), repeat=size):
                move = np.zeros(len(PARAM_LOW))
                move[list(axes)] = signs
                moves.append(move)
    return np.array(moves)


def fit_energy(rows: Sequence[tuple]) -> tuple:
    """(power_w, j_per_flop, j_per_byte, j_per_tile_byte, hbm_stream_w, relative RMS): non-negative
    least squares over rows of (energy_j, latency_s, flops, bytes, tile bytes, HBM seconds), each
    row scaled by 1 / energy_j and each column by its RMS (they differ by 15 decades). Every subset
    of the terms is solved and the best non-negative solution kept."""
    raw = np.array([[term / row[0] for term in row[1:]] for row in rows])  # [rows, terms]
    terms = raw.shape[1]
    scale = np.sqrt((raw ** 2).mean(0))
    scale[scale == 0] = 1.0
    scaled = raw / scale
    best = (math.inf, np.zeros(terms))
    for size in range(1, terms + 1):
        for subset in itertools.combinations(range(terms), size):
            solution, _, rank, _ = np.linalg.lstsq(scaled[:, subset], np.ones(len(scaled)), rcond=None)
            if rank < len(subset) or solution.min() < 0:  # collinear terms, or a negative one
                continue
            coeffs = np.zeros(terms)
            coeffs[list(subset)] = solution
            loss = float(((scaled @ coeffs - 1.0) ** 2).sum())
            if loss < best[0]:
                best = (loss, coeffs)
    loss, coeffs = best
    return (*map(float, coeffs / scale), math.sqrt(loss / len(rows)))


def fit_op(points: Sequence[tuple], energy_points: Sequence[tuple]) -> OpFit:
    """An ``OpFit``: its latency constants from ``points`` of (latency_ms, energy_j or None, launch times,
    ``work_totals``), its energy constants from ``energy_points`` of the same form (the op's pool's)."""
    *latency_fit, latency_rms = fit_latency([(p[0], p[2]) for p in points])
    energy_rows = [(e, t * 1e-3, *totals, hbm_seconds(times)) for t, e, times, totals in energy_points
                   if e is not None]
    *energy_fit, energy_rms = fit_energy(energy_rows) if energy_rows else (0.0, 0.0, 0.0, 0.0, 0.0, None)
    return OpFit(*latency_fit, *energy_fit, latency_rms, energy_rms)
