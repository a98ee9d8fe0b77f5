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


# ---- impossible inputs and fits -------------------------------------------------------------------

TS = np.arange(20.0)
PS = np.where(TS < 10, 300.0, 100.0)
MODEL = ThermalModel(40.0, 0.03, 10.0, 0.0, 4)


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: fit_thermal_model(TS, PS, -400 + PS * 0.01), ValueError, r"temps_c must be temperatures in \(-273.15"),
    (lambda: fit_thermal_model(TS, PS, 1e6 + PS * 0.01), ValueError, "temps_c must be temperatures in"),
    (lambda: fit_thermal_model(TS, -PS, 50 + PS * 0.01), ValueError, "powers_w must be finite board powers >= 0"),
    (lambda: fit_thermal_model(TS, PS, 80 - PS * 0.05), ValueError, "thermal resistance of -0.0455"),
    (lambda: fit_thermal_model([], [], []), ValueError, "at least 4 readings"),
    (lambda: fit_thermal_model(TS, PS, ["hot"] * 20), TypeError, "temps_c must be a 1-D sequence of numbers"),
    (lambda: fit_thermal_model(TS, PS, (50 + PS * 0.01)[None]), ValueError, "temps_c must be 1-D"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, min_tau_s=0), ValueError, "min_tau_s must be a finite number >"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, min_tau_s=-1), ValueError, "min_tau_s must be a finite number"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, min_tau_s=np.nan), ValueError, "min_tau_s must be a finite"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, max_tau_s=np.inf), ValueError, "max_tau_s must be a finite"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, min_tau_s="1"), TypeError, "min_tau_s must be a real number"),
    (lambda: fit_thermal_model(TS, PS, 50 + PS * 0.01, min_tau_s=100, max_tau_s=1), ValueError,
     "min_tau_s .* must be below max_tau_s"),
    (lambda: ThermalModel(40.0, 0.03, 0.0, 0.0, 4), ValueError, "time_constant_s must be a finite number > 0"),
    (lambda: ThermalModel(40.0, 0.03, -1.0, 0.0, 4), ValueError, "time_constant_s must be a finite number > 0"),
    (lambda: ThermalModel(40.0, 0.03, np.nan, 0.0, 4), ValueError, "time_constant_s"),
    (lambda: ThermalModel(40.0, 0.0, 10.0, 0.0, 4), ValueError, "resistance_c_per_w must be a finite number > 0"),
    (lambda: ThermalModel(40.0, -0.03, 10.0, 0.0, 4), ValueError, "resistance_c_per_w"),
    (lambda: ThermalModel(-300.0, 0.03, 10.0, 0.0, 4), ValueError, r"ambient_c must be a finite number in \(-273.15"),
    (lambda: ThermalModel(np.nan, 0.03, 10.0, 0.0, 4), ValueError, "ambient_c"),
    (lambda: ThermalModel(40.0, 0.03, 10.0, -1.0, 4), ValueError, "fit_rmse_c"),
    (lambda: ThermalModel(40.0, 0.03, 10.0, 0.0, 1.5), TypeError, "n_samples must be an int"),
    (lambda: ThermalModel("40", 0.03, 10.0, 0.0, 4), TypeError, "ambient_c must be a real number"),
    (lambda: MODEL.rise_c(-100.0, 1.0, 50.0), ValueError, "power_w must be a finite number >= 0"),
    (lambda: MODEL.rise_c(100.0, -1.0, 50.0), ValueError, "duration_s must be a finite number >= 0"),
    (lambda: MODEL.rise_c(100.0, 1.0, -300.0), ValueError, "start_c must be a finite number in"),
    (lambda: MODEL.rise_c("100", 1.0, 50.0), TypeError, "power_w must be a real number"),
    (lambda: MODEL.steady_state_c(np.inf), ValueError, "power_w must be a finite number"),
    (lambda: MODEL.simulate([], [], 50.0), ValueError, "simulate needs at least one time"),
    (lambda: MODEL.simulate([0.0, 1.0], [100.0], 50.0), ValueError, "one power per time"),
    (lambda: MODEL.simulate([1.0, 0.0], [100.0, 100.0], 50.0), ValueError, "times_s must be strictly increasing"),
    (lambda: MODEL.simulate([0.0, 1.0], [100.0, -1.0], 50.0), ValueError, "powers_w must be finite board powers"),
    (lambda: MODEL.simulate([0.0, 1.0], [100.0, 100.0], np.nan), ValueError, "start_c must be a finite number"),
])
def test_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_simulate_one_time_is_the_start():
    assert MODEL.simulate([0.0], [100.0], 50.0).tolist() == [50.0]


def test_fit_refuses_an_ambient_below_absolute_zero():
    """Readings that fit only with an ambient below -273.15 °C (steep R, cold start) are no model."""
    times, powers, _ = heat_soak()
    temps = -270.0 + 0.5 * (powers - 75.0)
    with pytest.raises(ValueError, match="ambient of .* no physical model"):
        fit_thermal_model(times, powers, temps)
