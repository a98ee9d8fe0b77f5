"""``python -m bench.hf_router_policies``: the policies on a patched transformers Qwen3-MoE, at CPU sizes."""
import json

import pytest
import torch

from tests.conftest import DEVICE, ON_GPU, usage_error

transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
if not hasattr(transformers, "Qwen3MoeForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3-MoE", allow_module_level=True)

from bench import hf_router_policies  # noqa: E402
from bench.harness import hf_policies  # noqa: E402
from bench.harness.policies import Policy  # noqa: E402
from kernels.moe_layer import TopKRouter  # noqa: E402
from router.oea import OEARouter  # noqa: E402

TINY_K = hf_policies.SHAPES["tiny"]["num_experts_per_tok"]


def tiny_model(num_layers=2):
    """Built on the CPU, then moved: torch.device("cuda") as a context caches its factory functions on first
    use, and conftest's poisoned torch.empty would be cached in place of the real one."""
    config = hf_policies.qwen3_config("tiny", num_layers)
    model, patched = hf_policies.build_model(config, "cpu", torch.float32, seed=0)
    return model.to(DEVICE), patched


@pytest.mark.skipif(ON_GPU, reason="the CPU sizes; on a GPU the command is run at its GPU defaults")
def test_cli_writes_every_policy_with_null_energy_and_routing_stats(tmp_path, capsys):
    argv = ["--decode", "1,4", "--oea_keep", "k1", "--ours_keep", "k1,p0.5", "--num_layers", "1", "--stat_steps", "1",
            "--output_dir", str(tmp_path)]  # one layer, one statistics step: the interpreter is slow
    assert hf_router_policies.main(argv) == 0
    report = json.loads((tmp_path / hf_router_policies.RESULTS).read_text())
    policies = report["policies"]
    assert list(policies) == ["topk", "oea_k1", "ours_k1", "ours_p0.5"]
    for entry in policies.values():
        assert [d["batch_size"] for d in entry["decode"]] == [1, 4]
        for decode in entry["decode"]:
            assert decode["step"]["energy_per_token_j"] is None and "GPU" in decode["step"]["energy_reason"]
            assert decode["step"]["latency_ms_median"] > 0
            assert decode["router"]["calls_per_layer"] == 1  # --stat_steps
    stats = {name: [d["router"] for d in entry["decode"]] for name, entry in policies.items()}
    assert stats["topk"][0]["distinct_experts_per_call"] == TINY_K and stats["topk"][1]["changed_slot_fraction"] == 0
    assert stats["oea_k1"][0]["distinct_experts_per_call"] == 1.0, "OEA at batch 1 runs only the kept expert"
    assert stats["oea_k1"][0]["active_experts_per_token"] == 1.0
    oea_b4 = stats["oea_k1"][1]
    assert 1 <= oea_b4["distinct_experts_per_call"] <= min(4, oea_b4["plain_distinct_experts_per_call"]), \
        "OEA at batch 4 loads no expert beyond the union of the 4 tokens' kept ones"
    assert stats["ours_k1"][0]["distinct_experts_per_call"] == 1.0, \
        "ours at batch 1: every unkept expert is idle, priced above a random gate's probabilities"
    assert report["model"]["moe_blocks_patched"] == 1 and report["model"]["attn_implementation"] == "sdpa"
    assert report["decode"]["mode"] == "eager" and "CUDA" in report["decode"]["mode_note"]
    assert report["cost_table"]["source"].startswith("analytic prior")
    assert report["quality"].startswith("not measured: random weights")
    assert report["hf_compat"]["transformers_detects_hf_kernels"] is False
    assert report["provenance"]["torch"] == torch.__version__
    rows = {(r["policy"], r["batch_size"]): r for r in report["summary"]["rows"]}
    assert rows[("topk", 4)]["distinct_experts_vs_topk"] == 1.0
    assert rows[("oea_k1", 1)]["distinct_experts_vs_topk"] == pytest.approx(1 / TINY_K)
    assert all(r["step_energy_vs_topk"] is None for r in rows.values())
    printed = capsys.readouterr().out.splitlines()
    assert printed[-9].startswith("policy") and printed[-1].startswith("ours_p0.5")


def test_decode_step_redecodes_one_slot_as_a_full_forward_predicts():
    """Every call decodes position C of the static cache again (rewound inside the step, captured on a
    GPU), and predicts what one causal forward over prompt + token predicts."""
    model, _ = tiny_model()
    prompt = torch.randint(0, 256, (2, 6), device=DEVICE)
    token = torch.randint(0, 256, (1, 2, 1), device=DEVICE)
    cache = hf_policies.static_cache(model.config, 2, 7, DEVICE, torch.float32)
    hf_policies.prefill(model, cache, prompt)
    step = hf_policies.DecodeStep(model, cache, 6, token, graph=ON_GPU)
    first = step().clone()
    again = step()
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt, token[0]], dim=1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, full, rtol=1e-4, atol=1e-4)


def test_gates_swap_share_the_hf_weights_and_restore():
    model, patched = tiny_model()
    gates = hf_policies.HFGates(model, cost_model=None)
    assert patched == len(gates.layers) == 2 and all(type(g) is TopKRouter for g in gates.plain)
    routers = gates.install(Policy("oea_k1", "oea", keep_top_k=1), None, track_stats=True)
    assert all(isinstance(r, OEARouter) and r.keep_top_k == 1 for r in routers)
    assert all(r.weight is p.weight for r, p in zip(routers, gates.plain)), "the HF gate weight is shared"
    assert gates.install(Policy("topk", "topk"), None, track_stats=False) == gates.plain
    assert [r.keep_top_k for r in gates.install(Policy("topk", "topk"), None, track_stats=True)] == [TINY_K] * 2
    gates.restore()
    assert [layer.gate for layer in gates.layers] == gates.plain


def test_default_policies():
    assert hf_router_policies.default_keeps(8) == (["k2", "k4"], ["k2", "p0.5"])
    assert hf_router_policies.default_keeps(4) == (["k1", "k2"], ["k1", "p0.5"])
    assert hf_router_policies.default_keeps(2) == (["k1"], ["k1", "p0.5"])
    args = hf_router_policies.parse_args(["--shape", "tiny"])
    assert [p.name for p in args.policies] == ["topk", "oea_k1", "oea_k2", "ours_k1", "ours_p0.5"]


@pytest.mark.parametrize("argv, expected", [
    (["--decode", "0"], "must be a positive integer, got '0'"),
    (["--decode", "1,1"], "repeats 1"),
    (["--context", "-3"], "must be a positive integer, got '-3'"),
    (["--stat_steps", "x"], "must be a positive integer"),
    (["--oea_keep", "p0.5"], "OEA keeps a number of experts (k<n>), got 'p0.5'"),
    (["--ours_keep", "q2"], "a keep setting is k<experts> or p<share"),
    (["--ours_keep", f"k{TINY_K}"], f"is plain top-k; give k < {TINY_K}"),
    (["--cost_table", "{dir}/missing.json"], "is not a file"),
    (["--output_dir", "{file}"], "exists and is not a directory"),
    (["--shape", "huge"], "invalid choice: 'huge'"),
])
def test_bad_arguments_are_refused(argv, expected, tmp_path, capsys):
    err, _ = usage_error(hf_router_policies.parse_args, ["--shape", "tiny"] + argv, tmp_path, capsys)
    assert expected in err
