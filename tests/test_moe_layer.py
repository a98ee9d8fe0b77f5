"""FusedMoE as a drop-in for transformers 5.x Mixtral, Qwen3-MoE and OLMoE sparse-MoE blocks."""
import numpy as np
import pytest
import torch

import kernels
from kernels.fused_experts import fused_experts_reference
from kernels.routing import route_reference
from tests.conftest import DEVICE, ON_GPU, assert_matches, randn

transformers = pytest.importorskip("transformers", reason="transformers is not installed here")

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=80, num_local_experts=8),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=40, intermediate_size=96,
                                                     num_experts=8, norm_topk_prob=True, head_dim=16),
    "qwen3_moe-raw-topk": lambda: transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=40, intermediate_size=96,
                                                              num_experts=8, norm_topk_prob=False, head_dim=16),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8),
}


def tiny_model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for p in model.parameters():  # seeded random weights everywhere: no zero-initialised router ties
            p.copy_(torch.randn_like(p) * 0.1)
    return model.to(DEVICE).eval()


def sparse_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in kernels.moe_layer.SUPPORTED_BLOCKS]


@pytest.mark.parametrize("name", CONFIGS)
def test_from_hf_block_matches_and_shares_weights(name):
    block = sparse_blocks(tiny_model(name))[0]
    fused = kernels.FusedMoE.from_hf(block)
    assert fused.experts.gate_up_proj is block.experts.gate_up_proj
    assert fused.experts.down_proj is block.experts.down_proj
    assert fused.router.weight is block.gate.weight
    x = randn(2, 7, 64)
    with torch.no_grad():
        assert_matches(fused(x), block(x), torch.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_patched_model_logits_and_greedy_generate_match(name):
    model = tiny_model(name)
    input_ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        logits = model(input_ids).logits
        tokens = model.generate(input_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        state = model.state_dict()
        assert kernels.patch_hf_model(model) == 2
        assert not sparse_blocks(model)
        patched_state = model.state_dict()
        assert patched_state.keys() == state.keys(), "save_pretrained must see the HF block's keys"
        assert all(patched_state[k].data_ptr() == state[k].data_ptr() for k in state), "weights shared, not copied"
        assert_matches(model(input_ids).logits, logits, torch.float32)
        assert torch.equal(model.generate(input_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False), tokens)


def assert_experts_run_on(function, model, input_ids, monkeypatch):
    """With ``set_experts_implementation("energy_moe")`` the model's logits are unchanged and each of
    its two layers' experts runs through ``kernels.moe_layer.<function>``."""
    calls = []
    real = getattr(kernels.moe_layer, function)
    monkeypatch.setattr(kernels.moe_layer, function, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        logits = model(input_ids).logits
        model.set_experts_implementation(kernels.register_hf_experts_implementation())
        assert_matches(model(input_ids).logits, logits, torch.float32)
    assert len(calls) == 2, f"each layer's experts must run through {function}"


def test_experts_implementation_flag_runs_fused_experts(monkeypatch):
    input_ids = torch.randint(1, 96, (1, 11), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_experts_run_on("fused_experts", tiny_model("qwen3_moe"), input_ids, monkeypatch)


def test_fused_moe_matches_torch_routing_and_experts():
    E, H, I, K = 8, 32, 24, 2
    router = kernels.TopKRouter(randn(E, H), K, renormalize=True)
    layer = kernels.FusedMoE(router, randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5))
    x = randn(3, 5, H)
    flat = x.reshape(-1, H)
    weights, ids = route_reference(flat @ router.weight.T, K)
    ref = fused_experts_reference(flat.double(), layer.experts.gate_up_proj.double(),
                                  layer.experts.down_proj.double(), ids, weights.double())
    with torch.no_grad():
        assert_matches(layer(x), ref.reshape(3, 5, H), torch.float32)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_gradients_match_the_hf_block(name):
    block = sparse_blocks(tiny_model(name))[0].train()
    block.jitter_noise = 0.0
    fused = kernels.FusedMoE.from_hf(block)
    x = randn(2, 5, 64)
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    grad_out = randn(2, 5, 64)
    hf_grads = torch.autograd.grad(block(x), params, grad_out)
    our_grads = torch.autograd.grad(fused(x), params, grad_out)
    for p_name, ours, ref in zip(("router", "gate_up_proj", "down_proj"), our_grads, hf_grads, strict=True):
        assert ours.shape == ref.shape, p_name
        assert_matches(ours, ref, torch.float32)


def test_bad_input():
    with pytest.raises(TypeError, match="block must be one of"):
        kernels.FusedMoE.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        kernels.patch_hf_model("mixtral")
    with pytest.raises(ValueError, match="top_k"):
        kernels.TopKRouter(randn(4, 8), 5)
    with pytest.raises(ValueError, match="weights_dtype"):
        kernels.TopKRouter(randn(4, 8), 2, weights_dtype=torch.bfloat16)
    block = sparse_blocks(tiny_model("olmoe"))[0]
    block.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="act_fn must be SiLU"):
        kernels.FusedMoE.from_hf(block)


class FixedRouter(torch.nn.Module):
    """A router module without ``num_experts``: only its outputs say what it routes to."""

    def __init__(self, num_experts, top_k):
        super().__init__()
        self.num_experts_out, self.top_k = num_experts, top_k

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_experts_out, device=x.device)
        ids = torch.arange(self.top_k, device=x.device).expand(x.shape[0], self.top_k)
        return logits, torch.ones(x.shape[0], self.top_k, device=x.device) / self.top_k, ids


E_, H_, I_ = 4, 16, 8
BAD_LAYERS = [  # (what is wrong, constructor arguments, error, phrase)
    ("router experts != experts", lambda: (kernels.TopKRouter(randn(4, H_), 2), randn(3, 2 * I_, H_),
                                           randn(3, H_, I_)), ValueError, "router has 4 experts but gate_up_proj holds 3"),
    ("router hidden != experts'", lambda: (kernels.TopKRouter(randn(E_, 12), 2), randn(E_, 2 * I_, H_),
                                           randn(E_, H_, I_)), ValueError, "router.weight has hidden size 12"),
    ("odd 2I", lambda: (kernels.TopKRouter(randn(E_, H_), 2), randn(E_, 7, H_), randn(E_, H_, 3)), ValueError,
     "gate_up_proj must be"),
    ("zero experts", lambda: (FixedRouter(0, 1), randn(0, 2 * I_, H_), randn(0, H_, I_)), ValueError,
     "gate_up_proj must be"),
    ("down_proj experts", lambda: (kernels.TopKRouter(randn(E_, H_), 2), randn(E_, 2 * I_, H_), randn(3, H_, I_)),
     ValueError, "down_proj"),
    ("down_proj dims", lambda: (kernels.TopKRouter(randn(E_, H_), 2), randn(E_, 2 * I_, H_), randn(E_, I_, H_)),
     ValueError, "down_proj"),
    ("router not a module", lambda: (lambda x: x, randn(E_, 2 * I_, H_), randn(E_, H_, I_)), TypeError, "router"),
    ("2-D experts", lambda: (kernels.TopKRouter(randn(E_, H_), 2), randn(2 * I_, H_), randn(H_, I_)), ValueError,
     "gate_up_proj"),
    ("mixed dtypes", lambda: (kernels.TopKRouter(randn(E_, H_), 2), randn(E_, 2 * I_, H_),
                              randn(E_, H_, I_).half()), TypeError, "down_proj"),
]


@pytest.mark.parametrize("what, make, error, phrase", BAD_LAYERS, ids=[w for w, _, _, _ in BAD_LAYERS])
def test_fused_moe_refuses_a_layer_that_does_not_fit(what, make, error, phrase):
    with pytest.raises(error, match=phrase):
        kernels.FusedMoE(*make())


BAD_ROUTERS = [
    ("float top_k", lambda: kernels.TopKRouter(randn(E_, H_), 2.0), TypeError, "top_k must be an int"),
    ("1-D weight", lambda: kernels.TopKRouter(randn(E_), 2), ValueError, "weight must have 2 dimensions"),
    ("empty weight", lambda: kernels.TopKRouter(randn(0, H_), 1), ValueError, "weight must be"),
    ("int weight", lambda: kernels.TopKRouter(torch.ones(E_, H_, dtype=torch.long), 1), TypeError, "weight"),
    ("list weight", lambda: kernels.TopKRouter([[1.0]], 1), TypeError, "weight"),
    ("renormalize", lambda: kernels.TopKRouter(randn(E_, H_), 2, renormalize="yes"), TypeError, "renormalize"),
]


@pytest.mark.parametrize("what, make, error, phrase", BAD_ROUTERS, ids=[w for w, _, _, _ in BAD_ROUTERS])
def test_top_k_router_refuses_bad_arguments(what, make, error, phrase):
    with pytest.raises(error, match=phrase):
        make()


def test_forward_checks_the_input_and_the_router_outputs():
    layer = kernels.FusedMoE(kernels.TopKRouter(randn(E_, H_), 2), randn(E_, 2 * I_, H_), randn(E_, H_, I_))
    with torch.no_grad():
        with pytest.raises(ValueError, match=f"hidden_states must be \\[..., {H_}\\]"):
            layer(randn(5, H_ + 1))
        with pytest.raises(TypeError, match="hidden_states"):
            layer(randn(5, H_).double())
        with pytest.raises(ValueError, match="hidden_states"):
            layer.router(randn(5, H_ + 1))
        layer.gate.selection_bias = torch.zeros(2 * E_, device=DEVICE)[::2][:2]  # a wrong-size bias view
        with pytest.raises(ValueError, match="selection_bias"):
            layer(randn(5, H_))
        layer.gate = FixedRouter(E_ + 1, 2)  # scores more experts than the layer holds
        with pytest.raises(ValueError, match="the router returned logits of shape \\(5, 5\\)"):
            layer(randn(5, H_))
        layer.gate = FixedRouter(E_, 2)
        assert layer(randn(2, 3, H_)).shape == (2, 3, H_)


def test_numpy_top_k_and_a_cpu_weight_for_later_moving_are_accepted():
    router = kernels.TopKRouter(torch.randn(E_, H_), np.int64(2))  # weights built on the CPU, moved later
    assert router.top_k == 2 and isinstance(router.top_k, int)


def test_numpy_sizes_and_bools_are_accepted():
    router = kernels.TopKRouter(randn(E_, H_), 2, renormalize=np.bool_(False))
    assert router.renormalize is False
    layer = kernels.FusedMoE(router, randn(E_, 2 * I_, H_), randn(E_, H_, I_), ep_chunks=np.int64(2),
                             ep_capacity=np.int32(8))
    assert (layer.ep_chunks, layer.ep_capacity) == (2, 8) and isinstance(layer.ep_capacity, int)


class OutputRouter(torch.nn.Module):
    """A router returning whatever ``make(x)`` gives."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def _fixed_outputs(x):
    return FixedRouter(E_, 2)(x)


BAD_ROUTER_OUTPUTS = [
    ("two values", lambda x: _fixed_outputs(x)[:2], "must return \\(router_logits, topk_weights, topk_ids\\), got 2"),
    ("a tensor", lambda x: _fixed_outputs(x)[0], "must return .*got Tensor"),
    ("logits None", lambda x: (None, *_fixed_outputs(x)[1:]), "router_logits of type NoneType"),
    ("ids a list", lambda x: (*_fixed_outputs(x)[:2], _fixed_outputs(x)[2].tolist()), "topk_ids of type list"),
]


@pytest.mark.parametrize("what, make, phrase", BAD_ROUTER_OUTPUTS, ids=[w for w, _, _ in BAD_ROUTER_OUTPUTS])
def test_a_router_returning_the_wrong_things_is_named(what, make, phrase):
    layer = kernels.FusedMoE(OutputRouter(make), randn(E_, 2 * I_, H_), randn(E_, H_, I_))
    with torch.no_grad(), pytest.raises(TypeError, match=phrase):
        layer(randn(5, H_))


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph capture needs a CUDA device (none found)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_whole_layer_is_graph_capturable(dtype):
    block = sparse_blocks(tiny_model("mixtral").to(dtype))[0]
    layer = kernels.FusedMoE.from_hf(block)
    x = randn(4, 16, 64, dtype=dtype)
    with torch.no_grad():
        layer(x)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        x.copy_(randn(4, 16, 64, dtype=dtype))
        graph.replay()
        assert torch.equal(captured, layer(x))
        assert_matches(captured, block(x), dtype)


def test_router_is_replaceable():
    E, H, I = 4, 16, 8
    layer = kernels.FusedMoE(kernels.TopKRouter(randn(E, H), 2), randn(E, 2 * I, H), randn(E, H, I))
    x = randn(5, H)
    bias = torch.zeros(E, device=DEVICE)
    bias[3] = 10.0
    biased = kernels.TopKRouter(layer.router.weight, 2)
    biased.selection_bias.copy_(bias)
    layer.gate = biased
    assert layer.router is biased
    _, _, ids = layer.router(x)
    assert (ids == 3).any(dim=1).all(), "the new router's bias steers selection"
    with torch.no_grad():
        assert layer(x).shape == (5, H)
