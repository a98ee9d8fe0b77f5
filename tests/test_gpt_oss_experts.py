"""gpt-oss experts on our fused-experts kernel: interleaved gate/up columns, biases, the clamped
GLU. Against the torch reference, against transformers' own ``GptOssExperts``, through
``set_experts_implementation("energy_moe")`` on a tiny gpt-oss model, bad input, and ``opcheck``."""
import pytest
import torch

import kernels
from kernels.gpt_oss_experts import gpt_oss_experts, gpt_oss_experts_reference
from tests.conftest import DEVICE, ON_GPU, assert_matches, randn
from tests.test_moe_layer import assert_experts_run_on

transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
ALPHA, LIMIT = 1.702, 7.0
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def experts(E, H, I, dtype, scale=1.0):
    """Weights whose pre-activations reach past the clamp limit (scale 3: many clamped lanes)."""
    return (randn(E, H, 2 * I, dtype=dtype, scale=scale * H ** -0.5) * 3, randn(E, 2 * I, dtype=dtype),
            randn(E, I, H, dtype=dtype, scale=I ** -0.5), randn(E, H, dtype=dtype))


def routing(T, K, E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    return ids.to(DEVICE), torch.softmax(torch.randn(T, K, generator=gen), -1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, I, E, K", [(1, 32, 16, 4, 2), (13, 48, 40, 6, 3), (0, 32, 16, 4, 2), (9, 16, 8, 1, 1)])
def test_matches_the_reference(dtype, T, H, I, E, K):
    x = randn(T, H, dtype=dtype)
    weights = experts(E, H, I, dtype)
    ids, w = routing(T, K, E, seed=T)
    ours = gpt_oss_experts(x, *weights, ids, w, ALPHA, LIMIT)
    ref = gpt_oss_experts_reference(x.double(), *(t.double() for t in weights), ids, w.double(), ALPHA, LIMIT)
    assert_matches(ours, ref.to(dtype), dtype)


def test_clamping_is_the_references():
    x = randn(5, 32) * 10  # far past the limit: the clamp decides the output
    weights = experts(3, 32, 16, torch.float32)
    ids, w = routing(5, 2, 3)
    ref = gpt_oss_experts_reference(x.double(), *(t.double() for t in weights), ids, w.double(), ALPHA, LIMIT)
    unclamped = gpt_oss_experts_reference(x.double(), *(t.double() for t in weights), ids, w.double(), ALPHA, 1e30)
    assert not torch.allclose(ref, unclamped), "the case exercises the clamp"
    assert_matches(gpt_oss_experts(x, *weights, ids, w, ALPHA, LIMIT), ref.float(), torch.float32)


def test_a_nan_token_stays_nan_through_the_clamp():
    x = randn(5, 32)
    x[1, 3] = float("nan")  # torch.clamp keeps NaN: the token's output is NaN, the others are untouched
    weights = experts(3, 32, 16, torch.float32)
    ids, w = routing(5, 2, 3)
    ours = gpt_oss_experts(x, *weights, ids, w, ALPHA, LIMIT)
    ref = gpt_oss_experts_reference(x.double(), *(t.double() for t in weights), ids, w.double(), ALPHA, LIMIT)
    assert ours[1].isnan().all() and ref[1].isnan().all()
    keep = torch.arange(5, device=DEVICE) != 1
    assert_matches(ours[keep], ref[keep].float(), torch.float32)


def tiny_gpt_oss_config():
    return transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=128, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                     eos_token_id=None)


def seeded_random(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return module


def test_matches_transformers_gpt_oss_experts():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    config = tiny_gpt_oss_config()
    hf = seeded_random(GptOssExperts(config)).to(DEVICE)
    x = randn(11, 64)
    ids, w = routing(11, 2, 4)
    with torch.no_grad():
        expected = hf(x, ids, w)
        ours = kernels.moe_layer._hf_experts_forward(hf, x, ids, w)
    assert_matches(ours, expected, torch.float32)


def test_experts_implementation_runs_a_gpt_oss_model(monkeypatch):
    model = seeded_random(transformers.AutoModelForCausalLM.from_config(tiny_gpt_oss_config())).to(DEVICE).eval()
    input_ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert_experts_run_on("gpt_oss_experts", model, input_ids, monkeypatch)


def test_gradients_are_the_references():
    x = randn(6, 32).requires_grad_()
    weights = [t.requires_grad_() for t in experts(3, 32, 16, torch.float32)]
    ids, w = routing(6, 2, 3)
    w.requires_grad_()
    gpt_oss_experts(x, *weights, ids, w, ALPHA, LIMIT).sum().backward()
    ours = [t.grad.clone() for t in (x, *weights, w)]
    for t in (x, *weights, w):
        t.grad = None
    gpt_oss_experts_reference(x, *weights, ids, w, ALPHA, LIMIT).sum().backward()
    for got, want in zip(ours, (x.grad, *(t.grad for t in weights), w.grad)):
        assert torch.equal(got, want), "the backward differentiates the torch reference"


def test_opcheck():
    x = randn(5, 32).requires_grad_()
    weights = [t.requires_grad_() for t in experts(3, 32, 16, torch.float32)]
    ids, w = routing(5, 2, 3)
    torch.library.opcheck(torch.ops.energy_moe.gpt_oss_experts.default, (x, *weights, ids, w, ALPHA, LIMIT))


def test_bad_input_is_named():
    x = randn(4, 32)
    gate_up, gate_up_bias, down, down_bias = experts(3, 32, 12, torch.float32)  # 2I != H: a transpose shows
    ids, w = routing(4, 2, 3)
    good = dict(hidden_states=x, gate_up_proj=gate_up, gate_up_proj_bias=gate_up_bias, down_proj=down,
                down_proj_bias=down_bias, top_k_index=ids, top_k_weights=w, alpha=ALPHA, limit=LIMIT)
    for name, value, error in (("gate_up_proj", gate_up[:, :, :-1], ValueError),
                               ("gate_up_proj", gate_up.transpose(1, 2), ValueError),
                               ("gate_up_proj_bias", gate_up_bias[:, :8], ValueError),
                               ("down_proj", down[:, :8], ValueError), ("down_proj_bias", down_bias[:2], ValueError),
                               ("down_proj_bias", down_bias.half(), TypeError),
                               ("top_k_index", ids.float(), TypeError), ("top_k_index", ids + 3, ValueError),
                               ("alpha", float("nan"), ValueError), ("limit", 0.0, ValueError),
                               ("limit", "7", TypeError)):
        with pytest.raises(error, match=name):
            gpt_oss_experts(**(good | {name: value}))
