"""The first-order thermal fit on synthetic heat-soaks with known answers."""
import numpy as np
import pytest

from calibration.thermal import ThermalModel, fit_thermal_model


def heat_soak(ambient=30.0, resistance=0.06, tau=25.0, noise_c=0.0, seed=0):
    """10 Hz readings: idle, a 60 s load at 650 W, a step to 400 W, then cooling at idle."""
    times = np.arange(0, 150, 0.1)
    powers = np.where(times < 10, 75.0, np.where(times < 70, 650.0, np.where(times < 100, 400.0, 75.0)))
    truth = ThermalModel(ambient, resistance, tau, 0.0, len(times))
    temps = truth.simulate(times, powers, start_c=truth.steady_state_c(75.0))
    temps = temps + np.random.default_rng(seed).normal(0, noise_c, len(temps)) if noise_c else temps
    return times, powers, temps


def test_fit_recovers_known_parameters():
    model = fit_thermal_model(*heat_soak())
    assert model.ambient_c == pytest.approx(30.0, rel=1e-3)
    assert model.resistance_c_per_w == pytest.approx(0.06, rel=1e-3)
    assert model.time_constant_s == pytest.approx(25.0, rel=1e-3)
    assert model.fit_rmse_c < 1e-3 and model.n_samples == 1500


def test_fit_with_sensor_noise_and_integer_readings():
    times, powers, temps = heat_soak(noise_c=0.3)
    model = fit_thermal_model(times, powers, np.round(temps))  # NVML reports whole degrees
    assert model.resistance_c_per_w == pytest.approx(0.06, rel=0.02)
    assert model.time_constant_s == pytest.approx(25.0, rel=0.05)
    assert 0.2 < model.fit_rmse_c < 1.0, "the reported error must reflect the noise, not hide it"


def test_rise_and_steady_state():
    model = ThermalModel(30.0, 0.06, 25.0, 0.0, 10)
    assert model.steady_state_c(500.0) == pytest.approx(60.0)
    assert model.rise_c(500.0, 25.0, start_c=40.0) == pytest.approx(20.0 * (1 - np.exp(-1)))
    assert model.rise_c(500.0, 0.0, start_c=40.0) == 0.0


@pytest.mark.parametrize("case, match", [
    ("short", "at least 4"), ("lengths", "equally long"), ("time", "strictly increasing"),
    ("nan", "finite"), ("constant", "constant"),
])
def test_fit_bad_input(case, match):
    times, powers, temps = heat_soak()
    if case == "short":
        times, powers, temps = times[:3], powers[:3], temps[:3]
    elif case == "lengths":
        temps = temps[:-1]
    elif case == "time":
        times = times[::-1]
    elif case == "nan":
        temps = temps.copy()
        temps[5] = np.nan
    else:
        powers = np.full_like(powers, 300.0)
    with pytest.raises(ValueError, match=match):
        fit_thermal_model(times, powers, temps)
