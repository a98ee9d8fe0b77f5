"""``FusedMoE``: a drop-in sparse-MoE layer (router + fused experts) for transformers 5.x models.

``FusedMoE.from_hf(block)`` wraps a Mixtral, Qwen3-MoE or OLMoE sparse-MoE block: it shares the
block's weight tensors (no copies), keeps its routing conventions (renormalisation, the dtype of
the gate weights) and returns what the block's forward returns. ``patch_hf_model(model)``
swaps every such block in a loaded model. The layer's ``router`` is replaceable: any module
returning ``(router_logits, topk_weights, topk_ids)`` from [T, H] hidden states fits
(``layer.gate = router``), which is where the energy-aware router plugs in.

Not carried over from the HF blocks: Mixtral's training-time jitter noise, and the router
logits that transformers records from its own router classes for ``output_router_logits``.
"""
import math
import numbers
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.validate import check_bool, check_dim, check_int, check_same_dtype_device, check_tensor
from kernels.expert_parallel import expert_parallel_experts
from kernels.fp8_experts import fp8_experts, quantize_fp8_weights
from kernels.fused_experts import fused_experts
from kernels.gpt_oss_experts import gpt_oss_experts
from kernels.quantize import FP8_DTYPE
from kernels.routing import check_selection_bias, route_checked

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock")
WEIGHT_DTYPES = (None, "fp8")  # None: the block's own dtype
EP_CHUNKS = 1


class TopKRouter(nn.Module):
    """Linear router + our routing kernel, with an additive [E] selection bias (zeros: plain top-k).

    ``weights_dtype=None`` keeps the gate weights in float32 (Mixtral's convention); ``"logits"``
    rounds them to the router logits' dtype (Qwen3-MoE's and OLMoE's)."""

    def __init__(self, weight, top_k, renormalize=True, weights_dtype=None):
        super().__init__()
        check_tensor("weight", weight, ndim=2, kernel_device=False)
        if weight.shape[0] == 0 or weight.shape[1] == 0:
            raise ValueError(f"weight must be [num_experts, hidden_size] with both >= 1, got {tuple(weight.shape)}")
        top_k = check_int("top_k", top_k, 1, weight.shape[0])
        renormalize = check_bool("renormalize", renormalize)
        if weights_dtype not in (None, "logits"):
            raise ValueError(f"weights_dtype must be None or 'logits', got {weights_dtype!r}")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_dtype = weights_dtype
        # not persistent: a patched model saves exactly the HF block's keys
        self.register_buffer("selection_bias", torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device),
                             persistent=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.half()``: the selection bias stays float32, the dtype the routing kernel reads."""
        super()._apply(fn, *args, **kwargs)
        self.selection_bias = self.selection_bias.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple:
        router_logits = self._router_logits(hidden_states)
        routing = route_checked(router_logits, self.top_k, self.selection_bias, self.renormalize)
        weights = routing.topk_weights
        if torch.is_grad_enabled() and router_logits.requires_grad:
            weights = self._differentiable_weights(router_logits, routing.topk_ids)
        if self.weights_dtype == "logits":
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, routing.topk_ids

    def _router_logits(self, hidden_states):
        """The gate's [T, E] logits of checked [T, H] hidden states (and a checked selection bias)."""
        check_tensor("hidden_states", hidden_states, ndim=2)
        check_same_dtype_device(hidden_states=hidden_states, weight=self.weight)
        check_dim("hidden_states", hidden_states, 1, self.weight.shape[1], "the hidden size of the router's weight")
        check_selection_bias(self.selection_bias, self.num_experts, self.weight.device)
        return F.linear(hidden_states, self.weight)

    def _differentiable_weights(self, router_logits, topk_ids):
        """The chosen experts' gate weights through torch ops, so training reaches the router
        (the kernel's weights carry no autograd graph); the selection stays the kernel's, and so
        does the NaN policy: NaN logits count as -inf, and an all-NaN token's weights are 0, not NaN.
        An empty slot (id -1, from ``kernels.policy_routing``) weighs 0."""
        probs = torch.softmax(router_logits.float().nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf),
                              dim=-1)
        probs = probs.nan_to_num(nan=0.0)  # a row of NaN/-inf only: 0, as the kernel gives
        ids = topk_ids.long()
        weights = probs.gather(1, ids.clamp_min(0)) * (ids >= 0)  # id -1: an empty slot, weight 0
        if not self.renormalize:
            return weights
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class Experts(nn.Module):
    """The experts' stacked weights: ``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I]."""

    def __init__(self, gate_up_proj, down_proj):
        super().__init__()
        self.gate_up_proj = gate_up_proj if isinstance(gate_up_proj, nn.Parameter) else nn.Parameter(gate_up_proj)
        self.down_proj = down_proj if isinstance(down_proj, nn.Parameter) else nn.Parameter(down_proj)

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return fused_experts(hidden_states, self.gate_up_proj, self.down_proj, topk_ids, topk_weights,
                             validate_ids=False)


class Fp8Experts(nn.Module):
    """The experts' weights in FP8 (``kernels.fp8_experts``): ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I] float8_e4m3fn, with float32 per-output-channel scales
    ``gate_up_proj_scale`` [E, 2I] and ``down_proj_scale`` [E, H], all buffers (inference only).

    Built from 16-bit weights, which it quantizes once. Its ``state_dict`` holds those four tensors
    (the FP8 weights and their scales); ``load_state_dict`` takes either that or a 16-bit
    checkpoint's weights without scales (transformers' keys), which it quantizes as it loads.
    ``.to(dtype)`` and ``.half()`` leave it as it is (FP8 weights, float32 scales); devices move it."""

    def __init__(self, gate_up_proj, down_proj):
        super().__init__()
        for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            q, scale = quantize_fp8_weights(weight.detach())
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return fp8_experts(hidden_states, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                           self.down_proj_scale, topk_ids, topk_weights, validate_ids=False)

    def _apply(self, fn, recurse=True):
        """Moves only: a dtype cast would widen the FP8 weights and round their scales."""
        device = fn(torch.empty(0, device=self.gate_up_proj.device)).device
        for name, buffer in self._buffers.items():
            self._buffers[name] = buffer.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("gate_up_proj", "down_proj"):
            weight = state_dict.get(prefix + name)
            unscaled = prefix + name + "_scale" not in state_dict
            if isinstance(weight, torch.Tensor) and weight.dtype != FP8_DTYPE and unscaled:
                state_dict[prefix + name], state_dict[prefix + name + "_scale"] = quantize_fp8_weights(weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FusedMoE(nn.Module):
    """Sparse MoE layer: the router picks K of E experts per token, our fused kernels run them.

    Args:
        router: a ``TopKRouter`` (or any module with its forward contract).
        gate_up_proj: [E, 2I, H] expert weights, gate rows first; with a ``process_group`` of W
            ranks, this rank's [E/W, 2I, H] (rank r owns experts [r*E/W, (r+1)*E/W)).
        down_proj: [E, H, I] (or this rank's [E/W, H, I]).
        process_group: None (every expert here), or a torch.distributed group for expert
            parallelism (``kernels.expert_parallel``): every rank routes its own tokens with the
            full router, tokens travel to the ranks owning their experts and back
            (``all_to_all_single``; with ``ep_capacity``, ``all_gather_into_tensor`` and
            ``reduce_scatter_tensor``). Forward-only.
        ep_chunks: with a process group, the chunks each rank's tokens are split into so that one
            chunk's experts run while the next chunk's tokens travel (the same on every rank;
            1 by default: more were slower on 2 and 4 H100s, eager and in CUDA graphs).
        ep_capacity: with a process group, None (exact-size exchange: one host sync per call to
            read the counts), or the most tokens per rank per call, the same on every rank: a
            fixed-size exchange with no host sync, which a CUDA graph can capture (each rank then
            sends all ``ep_capacity`` rows to every rank; a call with more tokens raises).
    The submodules are named as in the HF blocks (``gate`` is the router, ``experts`` holds the
    weights), so a patched model's ``state_dict`` keeps its keys; ``router`` reads ``gate``.
    Forward: hidden_states [..., H] -> [..., H]. Without a process group, or with ``ep_capacity``,
    there is no host sync (capturable in a CUDA graph). Without a process group, gradients reach the
    experts, the hidden states and the router (through the chosen experts' gate weights, as in the
    HF blocks); the experts' backward recomputes the torch reference.
    """

    def __init__(self, router, gate_up_proj, down_proj, process_group=None, ep_chunks=EP_CHUNKS, ep_capacity=None):
        super().__init__()
        _check_layer(router, gate_up_proj, down_proj, process_group)
        self.gate = router
        self.experts = Experts(gate_up_proj, down_proj)
        self.process_group = process_group
        if not _is_count(ep_chunks):
            raise ValueError(f"ep_chunks must be an int >= 1, got {ep_chunks!r}")
        self.ep_chunks = int(ep_chunks)
        if ep_capacity is not None and not _is_count(ep_capacity):
            raise ValueError(f"ep_capacity must be None or an int >= 1 (tokens per rank), got {ep_capacity!r}")
        self.ep_capacity = None if ep_capacity is None else int(ep_capacity)
        if process_group is not None:
            _check_expert_shard(router.num_experts, gate_up_proj.shape[0], process_group)

    @property
    def router(self) -> nn.Module:
        """The router (read-only alias; replace it with ``layer.gate = new_router``)."""
        return self.gate

    def quantize_fp8(self) -> "FusedMoE":
        """Convert the experts' weights to FP8 (``Fp8Experts``) in place, once, and return the layer;
        the 16-bit expert weights it replaces are freed unless something else holds them (an HF
        block this layer was built from). Inference only, and not with expert parallelism."""
        if isinstance(self.experts, Fp8Experts):
            return self
        if self.process_group is not None:
            raise ValueError("quantize_fp8 does not support an expert-parallel FusedMoE (process_group is set)")
        self.experts = Fp8Experts(self.experts.gate_up_proj, self.experts.down_proj)
        return self

    @classmethod
    def from_hf(cls, block: nn.Module, process_group: "ProcessGroup | None" = None, ep_chunks: int = EP_CHUNKS,
                ep_capacity: int | None = None, weight_dtype: str | None = None) -> "FusedMoE":
        """Build from a transformers 5.x Mixtral / Qwen3-MoE / OLMoE sparse-MoE block, sharing its
        weights; with a ``process_group``, this rank keeps a copy of its E/W experts only (so the
        block's full weights can be freed) and the router stays whole. ``weight_dtype="fp8"``
        converts the experts (``quantize_fp8``): the block's 16-bit weights are then no longer
        shared, and are freed with the block."""
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
        kind = type(block).__name__
        if kind not in SUPPORTED_BLOCKS:
            raise TypeError(f"block must be one of {', '.join(SUPPORTED_BLOCKS)}, got {kind}")
        act = type(block.experts.act_fn).__name__
        if act not in ("SiLU", "SiLUActivation"):
            raise ValueError(f"block.experts.act_fn must be SiLU for the fused SwiGLU experts, got {act}")
        gate = block.gate
        if kind == "MixtralSparseMoeBlock":
            router = TopKRouter(gate.weight, gate.top_k, renormalize=True, weights_dtype=None)
        else:
            router = TopKRouter(gate.weight, gate.top_k, renormalize=gate.norm_topk_prob, weights_dtype="logits")
        gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
        if process_group is not None:
            _check_expert_shard(router.num_experts, None, process_group)
            gate_up, down = (_local_experts(w, process_group) for w in (gate_up, down))
        layer = cls(router, gate_up, down, process_group, ep_chunks, ep_capacity)
        return layer.quantize_fp8() if weight_dtype == "fp8" else layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_tensor("hidden_states", hidden_states, ndim=None)
        hidden_size = self.experts.gate_up_proj.shape[2]
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != hidden_size:
            raise ValueError(f"hidden_states must be [..., {hidden_size}] (the experts' hidden size), "
                             f"got shape {tuple(hidden_states.shape)}")
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self.gate(flat)
        self._check_routing(flat, routing)
        router_logits, topk_weights, topk_ids = routing
        if self.process_group is None or dist.get_world_size(self.process_group) == 1:
            return self.experts(flat, topk_ids, topk_weights).reshape(shape)
        if torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("the expert-parallel FusedMoE is forward-only (no backward through all_to_all): "
                               "call it under torch.no_grad() or torch.inference_mode()")
        if self.ep_capacity is not None and flat.shape[0] > self.ep_capacity:
            raise ValueError(f"hidden_states has {flat.shape[0]} tokens, more than ep_capacity={self.ep_capacity}")
        return expert_parallel_experts(flat, topk_ids, topk_weights, self.experts.gate_up_proj,
                                       self.experts.down_proj, self.process_group, chunks=self.ep_chunks,
                                       capacity=self.ep_capacity).reshape(shape)

    def _check_routing(self, flat, routing):
        """Shapes only (no sync): the router returns three tensors and scores this layer's experts, one row per token
        (its weights are ``fused_experts``' top_k_weights, checked there)."""
        if not isinstance(routing, (tuple, list)) or len(routing) != 3:
            got = f"{len(routing)} values" if isinstance(routing, (tuple, list)) else type(routing).__name__
            raise TypeError(f"the router must return (router_logits, topk_weights, topk_ids), got {got}")
        router_logits, _, topk_ids = routing
        for name, value in (("router_logits", router_logits), ("topk_ids", topk_ids)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"the router returned {name} of type {type(value).__name__}; expected a torch.Tensor")
        num_experts = self.experts.gate_up_proj.shape[0]
        if self.process_group is not None:
            num_experts *= dist.get_world_size(self.process_group)
        if router_logits.shape != (flat.shape[0], num_experts):
            raise ValueError(f"the router returned logits of shape {tuple(router_logits.shape)}; expected "
                             f"({flat.shape[0]}, {num_experts}): one row per token over the layer's experts")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != flat.shape[0] or not 1 <= topk_ids.shape[1] <= num_experts:
            raise ValueError(f"the router returned topk_ids of shape {tuple(topk_ids.shape)}; expected "
                             f"({flat.shape[0]}, K) with 1 <= K <= {num_experts}")


def _is_count(value):
    """An int >= 1 (numpy integers too; never a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_layer(router, gate_up_proj, down_proj, process_group):
    """The router is a module, and it and the experts agree on experts and hidden size."""
    if not isinstance(router, nn.Module):
        raise TypeError(f"router must be a torch.nn.Module, got {type(router).__name__}")
    for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        check_tensor(name, weight, ndim=3, kernel_device=False)
    check_same_dtype_device(gate_up_proj=gate_up_proj, down_proj=down_proj)
    E, two_i, H = gate_up_proj.shape
    if E == 0 or two_i == 0 or H == 0 or two_i % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H] with E, I, H >= 1, got {tuple(gate_up_proj.shape)}")
    check_dim("down_proj", down_proj, 0, E, "the experts of gate_up_proj")
    check_dim("down_proj", down_proj, 1, H, "dim 2 (the hidden size) of gate_up_proj")
    check_dim("down_proj", down_proj, 2, two_i // 2, "half of dim 1 of gate_up_proj")
    router_experts = getattr(router, "num_experts", None)
    if process_group is None and router_experts is not None and router_experts != E:
        raise ValueError(f"router has {router_experts} experts but gate_up_proj holds {E}")
    router_weight = getattr(router, "weight", None)
    if isinstance(router_weight, torch.Tensor) and router_weight.dim() == 2 and router_weight.shape[1] != H:
        raise ValueError(f"router.weight has hidden size {router_weight.shape[1]} but the experts' is {H}")


def _check_expert_shard(num_experts, local_experts, process_group):
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}")
    world_size = dist.get_world_size(process_group)
    if num_experts % world_size:
        raise ValueError(f"process_group has {world_size} ranks, which does not divide the router's {num_experts} "
                         "experts")
    if local_experts is not None and local_experts != num_experts // world_size:
        raise ValueError(f"gate_up_proj holds {local_experts} experts; with {world_size} ranks and {num_experts} "
                         f"router experts each rank holds {num_experts // world_size}")


def _local_experts(weight, process_group):
    """This rank's contiguous slice of an [E, ...] expert weight, as its own parameter."""
    per_rank = weight.shape[0] // dist.get_world_size(process_group)
    first = dist.get_rank(process_group) * per_rank
    return nn.Parameter(weight.detach()[first:first + per_rank].clone(), requires_grad=weight.requires_grad)


def patch_hf_model(model: nn.Module, weight_dtype: str | None = None) -> int:
    """Replace every supported sparse-MoE block in ``model`` with a weight-sharing ``FusedMoE``;
    with ``weight_dtype="fp8"``, one with FP8 experts (each block's 16-bit expert weights are freed
    as it is replaced, so the peak is one layer's conversion).

    Returns the number of blocks replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    # names, not modules: each block is dropped (and its weights freed) as soon as it is replaced
    targets = [name for name, module in model.named_modules() if type(module).__name__ in SUPPORTED_BLOCKS]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedMoE.from_hf(getattr(parent, child), weight_dtype=weight_dtype))
    return len(targets)


HF_EXPERTS_IMPLEMENTATION = "energy_moe"


def register_hf_experts_implementation() -> str:
    """Register our fused experts with transformers' experts-implementation mechanism.

    Afterwards ``from_pretrained(..., experts_implementation="energy_moe")`` or
    ``model.set_experts_implementation("energy_moe")`` runs every ``@use_experts_implementation``
    experts module (Mixtral, Qwen3-MoE, OLMoE, ...) on ``fused_experts``, and gpt-oss's on
    ``gpt_oss_experts``. Returns the name."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(HF_EXPERTS_IMPLEMENTATION, _hf_experts_forward)
    return HF_EXPERTS_IMPLEMENTATION


def _hf_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    layout = (experts.has_gate, experts.has_bias, experts.is_transposed, experts.is_concatenated)
    if type(experts).__name__ == "GptOssExperts" and layout == (True, True, True, False):
        return gpt_oss_experts(hidden_states, experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj,
                               experts.down_proj_bias, top_k_index, top_k_weights, experts.alpha, experts.limit,
                               validate_ids=False)
    if layout != (True, False, False, True) or type(experts.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"{type(experts).__name__} is neither a bias-free, concatenated [gate; up] SiLU expert "
                         f"layout nor gpt-oss's experts, which are what '{HF_EXPERTS_IMPLEMENTATION}' runs")
    return fused_experts(hidden_states, experts.gate_up_proj, experts.down_proj, top_k_index, top_k_weights,
                         validate_ids=False)
