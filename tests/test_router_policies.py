"""``python -m bench.router_policies`` end to end at CPU sizes, its pieces, and its refusals."""
import json

import pytest
import torch

from bench import router_policies
from bench.harness.models import TransformerLM, model_dims
from bench.harness.policies import DecodeStream, default_keeps, parse_keep, policy_grid, stream_rows
from bench.harness.policy_report import comparison_rows, summarize
from tests.conftest import ON_GPU, usage_error

pytestmark = pytest.mark.skipif(ON_GPU, reason="the CPU sizes; the GPU run is the committed results file")

SMALL = ["--decode", "1,4", "--oea_keep", "k1", "--ours_keep", "k1,p0.6", "--ttt_keep", "k1", "--decode_bytes",
         "32", "--forward_eval_bytes", "64"]


def test_cli_writes_every_policy_with_null_energy_and_reasons(tmp_path, capsys):
    assert router_policies.main(SMALL + ["--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / router_policies.RESULTS).read_text())
    assert set(report["policies"]) == {"topk", "oea_k1", "ours_k1", "ours_p0.6", "ours_k1_ttt"}
    for entry in report["policies"].values():
        assert [d["batch_size"] for d in entry["decode"]] == [1, 4]
        for decode in entry["decode"]:
            assert decode["bits_per_byte"] > 0 and decode["predicted_bytes"] > 0
            assert decode["step"]["energy_per_token_j"] is None and "GPU" in decode["step"]["energy_reason"]
        assert entry["forward"]["bits_per_byte"] > 0
    oea_b1 = report["policies"]["oea_k1"]["decode"][0]["router"]
    assert oea_b1["distinct_experts_per_call"] == 1.0 and oea_b1["active_experts_per_token"] == 1.0, \
        "OEA at batch 1 runs only the kept expert"
    ours_b1 = report["policies"]["ours_k1"]["decode"][0]["router"]
    assert ours_b1["distinct_experts_per_call"] == 1.0 and ours_b1["plain_distinct_experts_per_call"] == 4.0, \
        "ours at batch 1: every unkept expert is idle, priced above a random gate's probabilities"
    assert report["cost_table"]["source"].startswith("analytic prior")
    assert report["plot"]["skipped"].startswith("no NVML energy")
    assert report["summary"]["targets"]["b16_energy_at_kept_quality"]["met"] is None
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("policy") for line in printed) and printed[-1].startswith("test_time_training")


def test_decode_stream_bits_per_byte_match_a_full_forward():
    """Teacher-forced decode through the KV cache predicts what one causal forward predicts."""
    dims = model_dims(64, 32, num_experts=4, top_k=2, d_ff=64)
    lm = TransformerLM(dims, 2, moe=True, use_kernels=False).eval()
    text = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    rows = stream_rows(text, 2, 6, 8, 16, "cpu")
    stream = DecodeStream(lm, rows, 6, graph=False)
    bits, predicted = stream.bits_per_byte()
    with torch.no_grad():
        logits = lm(rows[0, :, :-1])[:, 6:]
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), rows[0, :, 7:].reshape(-1),
                                             reduction="sum")
    assert predicted == 16
    assert bits == pytest.approx(nats.item() / 16 / torch.log(torch.tensor(2.0)).item(), rel=1e-4)


def test_keep_settings_parse_and_default():
    assert parse_keep("k3") == (3, None) and parse_keep("p0.25") == (None, 0.25)
    for bad in ("k", "p0", "p1.5", "q2", "k-1", "pnan"):
        with pytest.raises(ValueError, match="keep setting"):
            parse_keep(bad)
    assert default_keeps(8) == (["k2", "k4", "k6"], ["k2", "k4", "p0.5", "p0.7"])
    assert default_keeps(2) == (["k1"], ["k1", "p0.5", "p0.7"])
    names = [p.name for p in policy_grid(["k2"], ["p0.5"], ["k2"])]
    assert names == ["topk", "oea_k2", "ours_p0.5", "ours_k2_ttt"]
    with pytest.raises(ValueError, match="OEA keeps a number"):
        policy_grid(["p0.5"], [], [])


def test_summary_states_targets_as_ratios_to_topk():
    def entry(bpb, step_j, moe_j, experts, latency=1.0):
        return {"decode": [{"batch_size": 16, "bits_per_byte": bpb, "step": {"energy_per_token_j": step_j,
                                                                          "latency_ms_median": latency},
                            "moe_layers": {"energy_per_token_j": moe_j},
                            "router": {"distinct_experts_per_call": experts}}]}
    results = {"topk": entry(3.0, 1.0, 0.8, 50), "oea_k2": entry(3.05, 0.6, 0.4, 20),
               "ours_k2": entry(3.02, 0.7, 0.45, 25), "ours_p0.5": entry(3.1, 0.5, 0.3, 15)}
    summary = summarize(results, None, num_layers=4)
    b16 = summary["targets"]["b16_energy_at_kept_quality"]
    assert b16["setting"] == "ours_k2" and b16["met"] is True and b16["moe_energy_vs_topk"] == pytest.approx(0.5625)
    oea = summary["targets"]["beats_oea_at_every_quality"]["per_oea_setting"][0]
    assert oea["ours"] == "ours_k2" and oea["beaten"] is False, "0.45 J is not below OEA's 0.4 J"
    rows = {r["policy"]: r for r in comparison_rows(results)}
    assert rows["ours_p0.5"]["bpb_vs_topk"] == pytest.approx(0.1 / 3.0)


def test_b1_overhead_is_the_router_against_the_same_experts_without_it():
    """At batch 1 ours_k2 runs OEA k2's experts: its extra latency and energy over OEA k2 are the
    router's own; a share setting, with no OEA twin, is held against plain top-k."""
    def entry(keep_top_k, latency_ms, step_j):
        return {"keep_top_k": keep_top_k, "decode": [{"batch_size": 1, "bits_per_byte": 3.0,
                                                      "step": {"energy_per_token_j": step_j, "latency_ms_median": latency_ms},
                                                      "router": None}]}
    results = {"topk": entry(None, 0.60, 0.16), "oea_k2": entry(2, 0.56, 0.116),
               "ours_k2": entry(2, 0.588, 0.120), "ours_p0.5": entry(None, 0.57, 0.125)}
    b1 = summarize(results, None, num_layers=4)["targets"]["b1_overhead"]
    k2, share = b1["per_setting"]["ours_k2"], b1["per_setting"]["ours_p0.5"]
    assert k2["against"] == "oea_k2" and k2["overhead_us_per_layer"] == pytest.approx(7.0)
    assert k2["energy_overhead_fraction"] == pytest.approx(0.120 / 0.116 - 1)
    assert share["against"] == "topk" and share["overhead_us_per_layer"] == pytest.approx(-7.5)
    assert b1["met"] is False, "7 us per layer is over the 5 us bound"


@pytest.mark.parametrize("argv, message", [
    (["--oea_keep", "p0.5"], "OEA keeps a number"),
    (["--ours_keep", "k9"], "keeps 9 experts but top_k is 4"),
    (["--ours_keep", "x"], "keep setting"),
    (["--context", "30", "--decode_steps", "30"], "must leave room"),
    (["--top_k", "1"], "top_k >= 2"),
    (["--output_dir", "{file}"], "is not a directory"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    err, paths = usage_error(router_policies.parse_args, argv, tmp_path, capsys)
    assert message in err


def test_timing_passes_alternate_the_policy_order(monkeypatch):
    """Pass 1 measures the policies in order, pass 2 in reverse; the merged entry's energy is the
    windows' mean, its spread their min and max."""
    from types import SimpleNamespace

    from bench.harness import policy_report
    from bench.harness.policies import Policy
    order, energies = [], iter([1.0, 2.0, 3.0, 5.0])

    def fake_timing(env, model, policy, monitor, rows, context, recorded, trials):
        order.append(policy.name)
        j = next(energies)
        window = {"latency_ms_median": j, "latency_runs": 7, "energy_per_token_j": j, "energy_per_token_j_min": j,
                  "energy_per_token_j_max": j, "power_w": 100.0, "window_s": [1.0], "method": "m"}
        return {"step": window}

    monkeypatch.setattr(policy_report, "decode_timing", fake_timing)
    policies = [Policy("topk", "topk"), Policy("oea_k2", "oea", keep_top_k=2)]
    args = SimpleNamespace(energy_trials=2, context=4)
    timings = policy_report.alternating_timings(None, None, policies, None, torch.zeros(8, 3), None, args)
    assert order == ["topk", "oea_k2", "oea_k2", "topk"]
    assert timings["topk"]["step"]["energy_per_token_j"] == pytest.approx(3.0)  # (1 + 5) / 2
    assert timings["oea_k2"]["step"]["energy_per_token_j_min"] == 2.0
    assert timings["oea_k2"]["step"]["energy_per_token_j_max"] == 3.0 and timings["topk"]["step"]["passes"] == 2


def test_verdict_lines_say_each_target_and_whether_ttt_pays():
    from bench.router_policies import verdict_lines
    targets = {"b1_overhead": {"met": False}, "hot_state": {"met": True},
               "test_time_training": {"ours_k4_ttt": {"pays": True}}}
    assert verdict_lines(targets) == ["b1_overhead: met=False", "hot_state: met=True",
                                      "test_time_training ours_k4_ttt: pays=True"]
    assert verdict_lines({"test_time_training": {"reason": "no test-time-training setting was run"}}) == \
        ["no target was evaluated"]
