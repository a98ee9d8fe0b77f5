"""bench.harness.graphs: graph-mode steps equal eager ones; test-time updates replay between them; on the GPU."""
import pytest
import torch

from bench.harness import graphs
from bench.harness.models import TransformerLM, model_dims, use_energy_aware_router
from bench.harness.ttt_model import TTTLanguageModel
from bench.harness.costs import prior_cost_model
from tests.conftest import rel_error, requires_gpu

DIMS = model_dims(64, 32, num_experts=8, top_k=2, d_ff=128)


def models(kind, adapt=True):
    """Two identical models (bf16, our kernels) of ``kind``; ``adapt=False`` freezes test-time training."""
    def one():
        lm = TransformerLM(DIMS, 2, moe=kind.startswith("moe"), device="cuda", dtype=torch.bfloat16, seed=1)
        if kind == "ttt":
            return TTTLanguageModel(lm, ttt_update_frequency=16, ttt_chunk_size=32, energy_aware_lr=1e-3)
        if kind == "moe_energy_aware":
            use_energy_aware_router(lm, prior_cost_model("H100", DIMS)[0], ttt_update_frequency=8, ttt_chunk_size=16,
                                    ttt_gate=True, energy_aware_lr=1e-3, adapt=adapt)
        return lm.eval()
    first, second = one(), one()
    if kind == "ttt":
        first.adapt = second.adapt = adapt
    return first, second


@requires_gpu
@pytest.mark.parametrize("kind", ["dense", pytest.param("ttt", marks=pytest.mark.xfail(
    strict=False, reason="open bug: on the H200 (2026-12-02) the frozen TTT model's graph decode step differs from "
    "the eager one (rel. error 0.785 here, 0.937 in a probe) when it is the first such pair the process builds and "
    "the forward steps stay alive; a second pair, or a script keeping other steps, matches exactly (0.0): in the "
    "whole suite on an H100 (2026-12-07) it passed, so it is not strict")),
    "moe_topk", "moe_energy_aware"])
def test_graph_steps_match_eager_steps(kind):
    """The same function, replayed: test-time training frozen, so both models keep their weights."""
    graph_model, eager_model = models(kind, adapt=False)
    tokens = torch.randint(0, 256, (2, 16), device="cuda")
    prompt, nxt = torch.randint(0, 256, (3, 9), device="cuda"), torch.randint(0, 256, (3, 1), device="cuda")
    with torch.no_grad():
        for name, build in (("forward", lambda m, mode: graphs.forward_step(m, tokens, mode)),
                            ("decode", lambda m, mode: graphs.decode_step(m, prompt, nxt, mode))):
            graph_step, eager_step = build(graph_model, "graph"), build(eager_model, "eager")
            for call in range(3):
                ours, ref = graph_step().float(), eager_step().float()
                assert rel_error(ours, ref) <= 1e-2, (name, call)  # bf16 tolerance


@requires_gpu
@pytest.mark.parametrize("kind", ["ttt", "moe_energy_aware"])
def test_graph_steps_replay_captured_updates(kind):
    """Updates replay as their own captured graph between forward replays: counted, and they move the weights."""
    model, _ = models(kind)
    adapters = graphs.adapting_modules(model)
    tokens = torch.randint(0, 256, (2, 16), device="cuda")  # 32 tokens a call: an update due before every call
    with torch.no_grad():
        step = graphs.forward_step(model, tokens, "graph")
        assert step.update_mode.startswith("captured")
        before = [p.detach().clone() for p in model.parameters()]
        counts = [a.ttt_updates for a in adapters]
        for _ in range(4):
            assert torch.isfinite(step().float()).all()
    assert all(a.ttt_updates == c + 4 for a, c in zip(adapters, counts))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@requires_gpu
def test_graph_decode_has_no_host_sync():
    lm, _ = models("moe_topk")
    prompt, nxt = torch.randint(0, 256, (4, 9), device="cuda"), torch.randint(0, 256, (4, 1), device="cuda")
    with torch.no_grad():
        step = graphs.decode_step(lm, prompt, nxt, "graph")
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_modes_are_checked():
    lm = TransformerLM(DIMS, 1, use_kernels=False)
    with pytest.raises(ValueError, match="mode"):
        graphs.forward_step(lm, torch.zeros(1, 4, dtype=torch.long), "compiled")
