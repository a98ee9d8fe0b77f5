"""calibration.meter_check and python -m bench.meter_check on a scripted NVML (no GPU, no Zeus).

The fake counter integrates the scripted power exactly and moves every 100 ms, as the H100's
does; the fake Zeus monitor reads it as ZeusMonitor does (counter at begin, counter at end)."""
import json
import random
import time
from types import SimpleNamespace

import pytest

from calibration.meter_check import check_window, integral_j, verdict
from calibration.nvml_meter import GpuMeter
from tests.conftest import ON_GPU
from tests.fake_nvml import FakeNvml

IDLE_W, WORK_W = 120.0, 600.0


class FakeZeus:
    def __init__(self, nvml):
        self.nvml, self.opened = nvml, {}

    def _counter_j(self):
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption("handle0") / 1000.0

    def begin_window(self, key, sync_execution=True):
        self.opened[key] = self._counter_j()

    def end_window(self, key, sync_execution=True):
        return SimpleNamespace(gpu_energy={0: self._counter_j() - self.opened.pop(key)})


def scripted_work(nvml):
    def run_for(seconds):
        nvml.power_w = WORK_W
        time.sleep(seconds)
        nvml.power_w = IDLE_W
        return 7
    return run_for


def test_each_method_measures_the_scripted_work():
    nvml = FakeNvml(power_w=IDLE_W)
    window = check_window(GpuMeter(nvml=nvml), FakeZeus(nvml), 0, scripted_work(nvml), 1.0, IDLE_W, random.Random(0))
    truth_j = WORK_W * window["work_s"]
    assert window["calls"] == 7
    assert window["ours"] == pytest.approx(truth_j, rel=2e-3), "edges on updates, idle margins removed"
    assert window["zeus_aligned"] == pytest.approx(window["ours"], rel=1e-3), "the same counter readings"
    assert window["power_integral"] == pytest.approx(truth_j, rel=2e-2)
    missed_j = truth_j - window["zeus"]
    assert 0 <= missed_j <= (WORK_W - IDLE_W) * 0.1 * 1.05, "Zeus misses at most one counter period of the work"


def test_integral_of_power_samples():
    samples = [(0.0, 100.0), (1.0, 300.0), (2.0, 300.0), (5.0, 999.0)]
    assert integral_j(samples, 0.0, 2.0) == pytest.approx(200.0 + 300.0)
    assert integral_j(samples, 0.5, 2.5) == pytest.approx(0.5 * 300.0 + 300.0 + 0.5 * 300.0), "ends held"
    assert integral_j(samples, 3.0, 4.0) is None


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: integral_j([(0.0, 100.0), (1.0, 100.0)], 1.0, 0.0), ValueError, r"t1 \(0.0\) must be at or after t0"),
    (lambda: integral_j([(0.0, 100.0), (1.0, 100.0)], float("nan"), 1.0), ValueError, "t0 must be a finite number"),
    (lambda: check_window(GpuMeter(nvml=FakeNvml()), None, 0, lambda s: 1, 1.0, IDLE_W, random.Random(0)), TypeError,
     "zeus must be a zeus.monitor.ZeusMonitor"),
], ids=["t1-before-t0", "t0-nan", "zeus-none"])
def test_bad_input(call, error, phrase):
    with pytest.raises(error, match=phrase):
        call()


def test_verdict_says_whether_they_agree_and_which_is_nearer_the_integral():
    def workload(zeus, integral):
        return {"vs_ours": {"zeus": zeus, "zeus_aligned": 1.0, "power_integral": integral}}
    result = verdict({"gemm": workload(0.983, 1.002), "add": workload(0.996, 0.990)})
    assert result["agree"] is False and result["zeus_minus_ours"]["gemm"] == pytest.approx(-0.017)
    assert result["nearer_the_power_integral"] == {"gemm": "ours", "add": "zeus"}
    assert verdict({"gemm": workload(1.004, None)})["agree"] is True


@pytest.mark.skipif(ON_GPU, reason="the CPU path")
def test_cli_without_a_gpu_reports_why_and_no_figure(tmp_path, capsys):
    from bench import meter_check
    out = tmp_path / "meter.json"
    assert meter_check.main(["--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["measured"] is False and "no CUDA device" in report["reason"] and report["workloads"] is None
    assert "measured nothing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--window_s", "0.5"], "--window_s"), (["--trials", "0"], "--trials"),
                                           (["--workloads", "conv"], "--workloads"),
                                           (["--output", "{dir}"], "is a directory")])
def test_cli_refuses_bad_arguments(argv, message, tmp_path, capsys):
    from bench import meter_check
    with pytest.raises(SystemExit) as exit_info:
        meter_check.parse_args([a.format(dir=tmp_path) for a in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not ON_GPU, reason="the workloads are CUDA graphs")
def test_every_workload_runs_and_is_capturable():
    import torch

    from bench.meter_check import WORKLOADS, workload_call
    from calibration.energy import GraphRunner
    for name in WORKLOADS:
        assert GraphRunner(workload_call(name, "cuda")).run_for(0.01) >= 1
    torch.cuda.synchronize()
