"""Our kernels as torch.library custom ops: schema, fake (meta) implementations and autograd checked
by ``torch.library.opcheck``, and ``torch.compile(fullgraph=True)`` tracing FusedMoE and a patched HF
model around them. On a CPU the ops run under the Triton interpreter and compile uses the
``aot_eager`` backend (tracing, fake tensors and AOT autograd; no code generation)."""
import warnings

import pytest
import torch

import kernels
from tests.conftest import DEVICE, ON_GPU, assert_matches, randn
from tests.test_moe_layer import sparse_blocks, tiny_model

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKEND = "inductor" if ON_GPU else "aot_eager"


def ids_of(T, K, E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE, torch.int32)


def op_cases():
    """(op name, args) at small odd shapes; float inputs need gradients where the op has autograd."""
    T, H, I, E, K = 5, 32, 24, 4, 2
    grad = dict(requires_grad=True)
    x = randn(T, H, dtype=DTYPE).requires_grad_()
    experts = (randn(E, 2 * I, H, dtype=DTYPE, scale=H ** -0.5).requires_grad_(),
               randn(E, H, I, dtype=DTYPE, scale=I ** -0.5).requires_grad_())
    q, k, v = (randn(2, 2, 9, 32, dtype=DTYPE).requires_grad_() for _ in range(3))
    return [
        ("swiglu_ffn", (x, randn(2 * I, H, dtype=DTYPE, scale=H ** -0.5).requires_grad_(),
                        randn(H, I, dtype=DTYPE, scale=I ** -0.5).requires_grad_())),
        ("fused_experts", (x, *experts, ids_of(T, K, E), torch.rand(T, K, device=DEVICE, **grad))),
        ("gather_sum", (randn(7, H, dtype=DTYPE).requires_grad_(),
                        torch.tensor([[0, 3, -1], [6, 6, 2]], device=DEVICE))),
        ("flash_attention", (q, k, v, True, 32 ** -0.5)),
        ("route", (randn(T, E, dtype=DTYPE), K, None, True)),
        ("route", (randn(T, E, dtype=DTYPE), K, torch.rand(E, device=DEVICE) * 0.1, False)),
        ("policy_routing", policy_args(randn(T, E, dtype=DTYPE), K)),
    ]


def policy_args(logits, top_k):
    """The flattened op arguments of OEA's fill (keep 1; the cost tensors are stand-ins it never reads)."""
    return (logits, top_k, 1, 0.0, False, None, True, False, *(logits,) * 4, [0.0] * 12, 2, 1, 2, False)


@pytest.mark.parametrize("name, args", op_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.energy_moe, name).default, args)


def test_custom_op_gradients_are_the_references():
    _, (x, gate_up, down) = op_cases()[0]
    kernels.swiglu_ffn(x, gate_up, down).sum().backward()
    grads = [t.grad.clone() for t in (x, gate_up, down)]
    for t in (x, gate_up, down):
        t.grad = None
    kernels.swiglu.swiglu_ffn_reference(x, gate_up, down).sum().backward()
    for ours, ref in zip(grads, (x.grad, gate_up.grad, down.grad)):
        assert torch.equal(ours, ref), "the backward differentiates the torch reference"


def fused_layer():
    E, H, I, K = 4, 32, 24, 2
    router = kernels.TopKRouter(randn(E, H, dtype=DTYPE), K)
    return kernels.FusedMoE(router, randn(E, 2 * I, H, dtype=DTYPE, scale=H ** -0.5),
                            randn(E, H, I, dtype=DTYPE, scale=I ** -0.5))


def test_fused_moe_compiles_with_fullgraph():
    torch._dynamo.reset()
    layer, x = fused_layer(), randn(3, 5, 32, dtype=DTYPE)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)(x)
    assert_matches(compiled, eager, DTYPE)


def test_a_patched_hf_model_compiles_with_fullgraph():
    torch._dynamo.reset()
    model = tiny_model("qwen3_moe")
    kernels.patch_hf_model(model)
    assert not sparse_blocks(model)
    input_ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        eager = model(input_ids).logits
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(input_ids).logits
    assert_matches(compiled, eager, torch.float32)


@pytest.mark.parametrize("keep", [dict(keep_top_k=1), dict(keep_share=0.5)])
def test_fused_moe_with_the_frozen_energy_aware_router_compiles_with_fullgraph(tmp_path, keep):
    """The deployed router (frozen, statistics off): its policy launch is the energy_moe::policy_routing op."""
    from calibration.results import write_json_atomic
    from costmodel.kernel_cost_model import KernelCostModel
    from router import EnergyAwareTTTRouter
    from tests.test_router import E, H, I, K, decode_table
    write_json_atomic(tmp_path / "TESTGPU.json", decode_table())
    model = KernelCostModel("TESTGPU", table=tmp_path / "TESTGPU.json")
    torch._dynamo.reset()
    plain = kernels.TopKRouter(randn(E, H, dtype=DTYPE), K)
    router = EnergyAwareTTTRouter.from_router(plain, model, objective_weights={"energy": 1.0, "quality": 1.0},
                                              adapt=False, track_stats=False, **keep)
    layer = kernels.FusedMoE(router, randn(E, 2 * I, H, dtype=DTYPE, scale=H ** -0.5),
                             randn(E, H, I, dtype=DTYPE, scale=I ** -0.5))
    x = randn(3, 5, H, dtype=DTYPE)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)(x)
    assert_matches(compiled, eager, DTYPE)


def test_untraced_calls_launch_directly_and_tracers_see_the_op(monkeypatch):
    """Eager calls that record no gradient skip the op's dispatch; a gradient to record, or a
    tracer (here fake tensors, as export uses), goes through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    _, (x, gate_up, down, ids, weights) = op_cases()[1]
    op = kernels.fused_experts.__globals__["_fused_experts_op"]
    calls = []
    monkeypatch.setattr(op, "op", lambda *args: calls.append("op") or op.launcher(*args))
    with torch.no_grad():
        direct = kernels.fused_experts(x, gate_up, down, ids, weights)
    assert calls == []
    kernels.fused_experts(x, gate_up, down, ids, weights)  # inputs that require grad
    assert calls == ["op"]
    monkeypatch.undo()
    real = [t.detach() for t in (x, gate_up, down, ids, weights)]
    with FakeTensorMode() as mode:
        fake = kernels.fused_experts(*(mode.from_tensor(t) for t in real), validate_ids=False)
    assert fake.shape == direct.shape and fake.dtype == direct.dtype  # the fake implementation, no launch
    traced = make_fx(lambda *args: kernels.fused_experts(*args, validate_ids=False), tracing_mode="real")(*real)
    assert "energy_moe.fused_experts" in traced.code  # plain tensors, but a dispatch mode records the op
    with warnings.catch_warnings():  # TorchScript is deprecated, and warns of the shape checks it sees
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(lambda *args: kernels.fused_experts(*args, validate_ids=False), tuple(real),
                                   check_trace=False)
    assert "energy_moe::fused_experts" in str(scripted.graph) and torch.equal(scripted(*real), direct)
