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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from costmodel.validate import ABSOLUTE_ZERO_C, MAX_GPU_TEMP_C, count, finite_number


@dataclass(frozen=True)
class ThermalModel:
    """A physical model: ambient in (-273.15, 200] °C, resistance and time constant > 0, else ValueError."""
    ambient_c: float
    resistance_c_per_w: float
    time_constant_s: float
    fit_rmse_c: float  # free-running simulation (from the fitted start) vs the readings
    n_samples: int

    def __post_init__(self):
        _temp_c("ambient_c", self.ambient_c)
        finite_number("resistance_c_per_w", self.resistance_c_per_w, low=0.0, low_open=True,
                      why=" °C/W (a card heats up with power)")
        finite_number("time_constant_s", self.time_constant_s, low=0.0, low_open=True, why=" s")
        finite_number("fit_rmse_c", self.fit_rmse_c, low=0.0, why=" °C")
        count("n_samples", self.n_samples, low=0)

    def steady_state_c(self, power_w: float) -> float:
        """The temperature (°C) the card settles at under ``power_w`` (W, finite, >= 0)."""
        return self.ambient_c + self.resistance_c_per_w * finite_number("power_w", power_w, low=0.0, why=" W")

    def simulate(self, times_s: "Sequence[float] | np.ndarray", powers_w: "Sequence[float] | np.ndarray",
                 start_c: float) -> np.ndarray:
        """Temperatures (°C) at ``times_s`` (s; 1-D, at least one, strictly increasing) from ``start_c`` (°C),
        with power ``powers_w[i]`` (one per time, >= 0 W) held over each step."""
        times_s, powers_w = _series("times_s", times_s), _series("powers_w", powers_w)
        if not len(times_s):
            raise ValueError("simulate needs at least one time in times_s, got none")
        if len(powers_w) != len(times_s):
            raise ValueError(f"powers_w must have one power per time: {len(powers_w)} powers for {len(times_s)} times")
        _check_times(times_s)
        _check_powers(powers_w)
        temps = np.empty_like(times_s)
        temps[0] = _temp_c("start_c", start_c)
        decay = np.exp(-np.diff(times_s) / self.time_constant_s)
        targets = self.ambient_c + self.resistance_c_per_w * powers_w
        for i, a in enumerate(decay):
            temps[i + 1] = targets[i] + (temps[i] - targets[i]) * a
        return temps

    def rise_c(self, power_w: float, duration_s: float, start_c: float) -> float:
        """Predicted temperature change (°C) after ``duration_s`` (s, >= 0) at ``power_w`` (W, >= 0) from
        ``start_c`` (°C)."""
        target = self.steady_state_c(power_w)
        duration_s = finite_number("duration_s", duration_s, low=0.0, why=" s")
        return (target - _temp_c("start_c", start_c)) * (1.0 - math.exp(-duration_s / self.time_constant_s))


def _temp_c(name, value):
    return finite_number(name, value, low=ABSOLUTE_ZERO_C, low_open=True, high=MAX_GPU_TEMP_C, why=" °C")


def _series(name, values):
    """``values`` as a 1-D float array; TypeError for anything but numbers."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _check_times(times_s):
    if not np.isfinite(times_s).all():
        raise ValueError("times_s must be finite")
    if not (np.diff(times_s) > 0).all():
        raise ValueError("times_s must be strictly increasing")


def _check_powers(powers_w):
    if not np.isfinite(powers_w).all() or (powers_w < 0).any():
        raise ValueError("powers_w must be finite board powers >= 0 W (drop readings NVML could not give)")


def _check_series(times_s, powers_w, temps_c):
    times_s, powers_w, temps_c = _series("times_s", times_s), _series("powers_w", powers_w), _series("temps_c", temps_c)
    if not len(times_s) == len(powers_w) == len(temps_c):
        raise ValueError(f"times_s, powers_w and temps_c must be 1-D and equally long, got shapes "
                         f"{times_s.shape}, {powers_w.shape}, {temps_c.shape}")
    if len(times_s) < 4:
        raise ValueError(f"the thermal fit needs at least 4 readings, got {len(times_s)}")
    if not np.isfinite(np.concatenate([times_s, powers_w, temps_c])).all():
        raise ValueError("times_s, powers_w and temps_c must be finite (drop readings NVML could not give)")
    _check_times(times_s)
    _check_powers(powers_w)
    if not ((temps_c > ABSOLUTE_ZERO_C) & (temps_c <= MAX_GPU_TEMP_C)).all():
        raise ValueError(f"temps_c must be temperatures in ({ABSOLUTE_ZERO_C}, {MAX_GPU_TEMP_C:g}] °C, got readings "
                         f"from {temps_c.min():g} to {temps_c.max():g} °C")
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


def fit_thermal_model(times_s: "Sequence[float] | np.ndarray", powers_w: "Sequence[float] | np.ndarray",
                      temps_c: "Sequence[float] | np.ndarray", min_tau_s: float = 0.5,
                      max_tau_s: float = 2000.0) -> ThermalModel:
    """Fit ``ThermalModel`` to readings: times (s, increasing), board power (W, >= 0), temperature (°C,
    above absolute zero), scanning tau over [min_tau_s, max_tau_s] (s, finite, 0 < min < max).

    A fit that is not a physical model (temperature not rising with power: resistance <= 0; or an
    ambient at or below absolute zero) is a ValueError saying so: it is never returned."""
    times_s, powers_w, temps_c = _check_series(times_s, powers_w, temps_c)
    min_tau_s = finite_number("min_tau_s", min_tau_s, low=0.0, low_open=True, why=" s")
    max_tau_s = finite_number("max_tau_s", max_tau_s, low=0.0, low_open=True, why=" s")
    if min_tau_s >= max_tau_s:
        raise ValueError(f"min_tau_s ({min_tau_s:g} s) must be below max_tau_s ({max_tau_s:g} s)")
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
    if not resistance > 0:
        raise ValueError(f"the readings give a thermal resistance of {resistance:.3g} °C/W (tau {tau:.3g} s): "
                         "temperature does not rise with power in them, so they fit no physical model; "
                         "fit over a heat-soak that loads the card")
    if not ABSOLUTE_ZERO_C < ambient <= MAX_GPU_TEMP_C:
        raise ValueError(f"the readings give an ambient of {ambient:.3g} °C (R {resistance:.3g} °C/W, tau "
                         f"{tau:.3g} s), outside ({ABSOLUTE_ZERO_C}, {MAX_GPU_TEMP_C:g}] °C: no physical model")
    return ThermalModel(float(ambient), float(resistance), tau, math.sqrt(mse), len(times_s))
