"""A scripted stand-in for the pynvml module, for testing the meter without a GPU.

Its energy counter integrates ``power_w`` over real time but, like the H100's, only advances
every ``update_period_s`` (100 ms); ``unsupported`` names functions that raise NotSupported."""
import time
from types import SimpleNamespace

from calibration.trace import PynvmlConstants


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class FakeNvml(PynvmlConstants):
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80

    def __init__(self, power_w=150.0, temperature_c=45, update_period_s=0.1, unsupported=(), fail_init=False):
        self._t0 = time.monotonic()
        self._segments = [(0.0, power_w)]  # (start s since _t0, watts): the energy counter integrates them
        self.temperature_c = temperature_c
        self.update_period_s = update_period_s
        self.unsupported = set(unsupported)
        self.fail_init = fail_init
        self.clock_event_reasons = 0

    @property
    def power_w(self):
        return self._segments[-1][1]

    @power_w.setter
    def power_w(self, watts):
        self._segments.append((time.monotonic() - self._t0, watts))

    def _energy_j_at(self, t):
        """Integral of the power segments from 0 to t (seconds since _t0)."""
        total = 0.0
        for (start, watts), nxt in zip(self._segments, self._segments[1:] + [(float("inf"), 0.0)]):
            total += watts * max(0.0, min(t, nxt[0]) - start)
        return total

    def _check(self, name):
        if name in self.unsupported:
            raise NVMLError_NotSupported("Not Supported")

    def nvmlInit(self):
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise NVMLError("Invalid Argument")
        return "handle0"

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle):
        return "GPU-00000000-fake-0000-0000-000000000000"

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._check("nvmlDeviceGetTotalEnergyConsumption")
        elapsed = time.monotonic() - self._t0
        return round(self._energy_j_at(elapsed - elapsed % self.update_period_s) * 1000)  # moves in steps

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        self._check("nvmlDeviceGetFieldValues")
        return [SimpleNamespace(fieldId=f, nvmlReturn=0, value=SimpleNamespace(uiVal=int(self.power_w * 1000)))
                for f in field_ids]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._check("nvmlDeviceGetTemperature")
        return self.temperature_c

    def nvmlDeviceGetTemperatureThreshold(self, handle, kind):
        self._check("nvmlDeviceGetTemperatureThreshold")
        return {0: 92, 1: 87}[kind]

    def nvmlDeviceGetClockInfo(self, handle, clock):
        self._check("nvmlDeviceGetClockInfo")
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self._check("nvmlDeviceGetCurrentClocksEventReasons")
        return self.clock_event_reasons

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._check("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(used=3 * 2 ** 30, total=80 * 2 ** 30, free=77 * 2 ** 30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._check("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=90, memory=40)
