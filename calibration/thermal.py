"""A first-order thermal model of the card, fitted to what a sweep itself produced.

    tau * dT/dt = T_ambient + R * P(t) - T

``R`` (°C/W) is the thermal resistance, ``tau`` (s) the time constant. Between two readings the
power is taken as constant, so each step is exact: T' = T_ss + (T - T_ss) * exp(-dt / tau) with
T_ss = T_ambient + R * P. The fit scans tau on a log grid (solving the start temperature, T_ambient
and R by linear least squares on the free-running simulation at each), refines it, and reports the
RMS error of that simulation against the readings.
Nothing here changes a GPU setting: the data is whatever heat the sweep generated.
"""
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ThermalModel:
    ambient_c: float
    resistance_c_per_w: float
    time_constant_s: float
    fit_rmse_c: float  # free-running simulation (from the fitted start) vs the readings
    n_samples: int

    def steady_state_c(self, power_w):
        return self.ambient_c + self.resistance_c_per_w * power_w

    def simulate(self, times_s, powers_w, start_c):
        """Temperatures at ``times_s`` from ``start_c``, with power ``powers_w[i]`` held over each step."""
        times_s, powers_w = np.asarray(times_s, float), np.asarray(powers_w, float)
        temps = np.empty_like(times_s)
        temps[0] = start_c
        decay = np.exp(-np.diff(times_s) / self.time_constant_s)
        for i, a in enumerate(decay):
            target = self.steady_state_c(powers_w[i])
            temps[i + 1] = target + (temps[i] - target) * a
        return temps

    def rise_c(self, power_w, duration_s, start_c):
        """Predicted temperature change after ``duration_s`` at ``power_w`` from ``start_c``."""
        target = self.steady_state_c(power_w)
        return (target - start_c) * (1.0 - math.exp(-duration_s / self.time_constant_s))


def _check_series(times_s, powers_w, temps_c):
    times_s, powers_w, temps_c = (np.asarray(a, dtype=float) for a in (times_s, powers_w, temps_c))
    if not (times_s.ndim == powers_w.ndim == temps_c.ndim == 1) or not len(times_s) == len(powers_w) == len(temps_c):
        raise ValueError(f"times_s, powers_w and temps_c must be 1-D and equally long, got shapes "
                         f"{times_s.shape}, {powers_w.shape}, {temps_c.shape}")
    if len(times_s) < 4:
        raise ValueError(f"the thermal fit needs at least 4 readings, got {len(times_s)}")
    if not np.isfinite(np.concatenate([times_s, powers_w, temps_c])).all():
        raise ValueError("times_s, powers_w and temps_c must be finite (drop readings NVML could not give)")
    if not (np.diff(times_s) > 0).all():
        raise ValueError("times_s must be strictly increasing")
    if np.ptp(powers_w) < 1e-6 * max(1.0, np.abs(powers_w).max()):
        raise ValueError("powers_w is constant: ambient and thermal resistance cannot be told apart; "
                         "fit over a heat-soak that changes the load")
    return times_s, powers_w, temps_c


def _solve_at(tau, times_s, powers_w, temps_c):
    """Least-squares (T_start, T_ambient, R) for a given tau, fitting the free-running simulation.

    The simulated trajectory is linear in those three, so each is a basis trajectory and the fit
    is linear; fitting the simulation (not one-step differences) keeps sensor noise from biasing it."""
    decay = np.exp(-np.diff(times_s) / tau)
    basis = np.empty((len(times_s), 3))
    basis[0] = (1.0, 0.0, 0.0)
    for i, a in enumerate(decay):  # each column follows x' = a x + (1 - a)(ambient + R P)
        basis[i + 1] = a * basis[i] + (1.0 - a) * np.array([0.0, 1.0, powers_w[i]])
    coef, *_ = np.linalg.lstsq(basis, temps_c, rcond=None)
    return coef, float(np.mean((basis @ coef - temps_c) ** 2))


def fit_thermal_model(times_s, powers_w, temps_c, min_tau_s=0.5, max_tau_s=2000.0):
    """Fit ``ThermalModel`` to readings: times (s, increasing), board power (W), temperature (°C)."""
    times_s, powers_w, temps_c = _check_series(times_s, powers_w, temps_c)
    grid = np.geomspace(min_tau_s, max_tau_s, 60)
    errors = [_solve_at(tau, times_s, powers_w, temps_c)[1] for tau in grid]
    best = int(np.argmin(errors))
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    for _ in range(40):  # golden-section refinement of log(tau)
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if _solve_at(math.exp(m1), times_s, powers_w, temps_c)[1] < _solve_at(math.exp(m2), times_s, powers_w,
                                                                               temps_c)[1]:
            hi = m2
        else:
            lo = m1
    tau = math.exp((lo + hi) / 2)
    (_, ambient, resistance), mse = _solve_at(tau, times_s, powers_w, temps_c)
    return ThermalModel(float(ambient), float(resistance), tau, math.sqrt(mse), len(times_s))
