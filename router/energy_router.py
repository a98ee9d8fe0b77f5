"""``EnergyAwareTTTRouter``: top-k routing biased toward experts that are cheap to run *now*.

The router is composed of parts, one module each: its arguments' checks (``router.options``),
the cost bias and hardware state (``router.cost.CostSelection``), test-time training
(``router.ttt.RouterTTT``) and expert placement (``router.placement``); this module holds the
selection policy and the forward.

It has ``kernels.TopKRouter``'s forward contract (hidden_states [T, H] -> router_logits [T, E],
topk_weights [T, K], topk_ids [T, K] int32), so it plugs into ``kernels.FusedMoE``.

**Cost bias** (``router.cost``). At decode sizes an expert's cost is mostly loading its weights: each
expert's selection bias is its marginal cost given the batch's plain top-k load, normalised by
the one-token cost, bounded by ``max_shift``; the routing kernel adds it for *selection only*.

**Baseline-preserving policy** (``keep_top_k`` or ``keep_share``; the knob users turn). Each token
keeps its plain top ``keep_top_k`` experts, or those holding ``keep_share`` of its top-k gate
weight; its other slots go, in order, to its highest ``probability + bias`` experts among the rest,
where the bias is the cost score (``router.cost``) computed against the *kept* experts' loads: an expert some
token keeps costs only its per-token work, an idle one its weight read. So a slot moves to an
already-woken expert whenever that one's probability is within about max_shift / 2 of the idle
expert it would otherwise wake (at quality 1, the default, max_shift = 1), and never crosses more
than max_shift. An idle expert is woken only where its probability exceeds its price (minus its
bias): otherwise the slot stays empty (id -1, weight 0), so at batch 1, where every unkept expert
is idle, a token runs about its kept experts, and a hotter card (a larger energy weight) wakes
fewer. A woken expert's per-token work is free at decode, so such a fill is never refused. The
weights stay the unbiased probabilities of the chosen experts, renormalised.
Kept slots, loads, bias and fill are one launch (``kernels.policy_routing``, ``fill="cost"``);
``router.OEARouter`` is the same launch with the published OEA fill (kept experts only). Without
either knob the router runs the older unkept mode below, where every slot may move.

**Hardware state** (``router.cost``): a ``router.monitor.HardwareMonitor``'s pinned NVML readings,
read in place by the kernels; the energy weight rises toward the slowdown threshold.

**Test-time training** (``router.ttt``): every ``ttt_update_frequency`` tokens, a sign step of
the bias offsets toward cheaper experts, and with ``ttt_gate`` one optimiser step of the gate.

**Expert placement** (``router.placement``): under expert parallelism a remote expert's
selection cost includes its all_to_all per routed token.

**Dynamic k.** ``top_p`` (off by default) keeps, per token, the chosen experts in descending
gate weight until their share of the token's top-k weight reaches ``top_p``; the rest get weight
0 (ids kept, so the [T, K] shape and ``fused_experts`` are unchanged).

**Bad input.** Hidden states of the wrong type, dtype or shape raise ``TypeError``/``ValueError``
naming ``hidden_states``. NaN logits count as -inf and +Inf logits (overflow, Inf inputs) as NaN:
a token with a NaN/Inf hidden state gets weight 0 on every expert, so it contributes nothing, and
the bias never selects a probability-0 expert over a positive one. Such tokens are counted
(``nan_tokens`` in ``stats()``).

Statistics and the TTT window accumulate on the device in one launch
(``kernels.routing_stats``); ``stats()`` reads them with one sync (``track_stats=False`` skips
the statistics). The bias itself is one kernel launch
(``kernels.cost_bias``), the re-selection a second routing launch.
"""
import math
from typing import Any

import torch
import torch.nn.functional as F

from costmodel.kernel_cost_model import KernelCostModel
from kernels.moe_layer import TopKRouter
from kernels.policy_routing import FillCost, policy_routing
from kernels.routing import check_selection_bias, topk_routing
from kernels.routing_stats import STAT_FIELDS, routing_tallies, tally_summary
from kernels.validate import check_bool, check_dim, check_same_dtype_device, check_tensor
from router.cost import COST_OP, EXPERT_COST_OPS, CostSelection, cost_model_at
from router.monitor import STATE_FIELDS, HardwareMonitor
from router.options import (check_hyperparameters, check_keep, check_objective_weights, check_sizes,
                            check_topk_router, gate_weight)
from router.placement import check_placement, placement_extra_cost
from router.ttt import RouterTTT, capturing

ATTRIBUTED_NOTE = "attributed, not metered: monitor board power x the updates' own GPU time"
__all__ = ["COST_OP", "EnergyAwareTTTRouter"]


class EnergyAwareTTTRouter(CostSelection, RouterTTT, TopKRouter):
    """Linear router whose top-k selection is biased by the measured marginal cost of each expert.

    Args:
        d_model, num_experts, top_k: H, E and K.
        kernel_cost_model: a ``costmodel.KernelCostModel`` whose table has ``swiglu_ffn``, at the
            experts' dims (``KernelCostModel.with_dims``); at another d_model the router costs
            experts of its own d_model with d_ff scaled alike, and warns.
        objective_weights: {"energy", "latency", "quality"} (non-negative, finite; missing keys take
            the defaults {1, 0, 1}). See the module docstring for their exact meaning.
        ttt_update_frequency: tokens between test-time updates.
        ttt_chunk_size: tokens of hidden states kept for the gate's update (``ttt_gate``).
        energy_aware_lr: step size of the offsets' sign step and of the gate's optimiser.
        muon_enabled: ``torch.optim.Muon`` for the gate weight (needs ``ttt_gate``).
        monitor: a ``HardwareMonitor``, or None (cost model alone).
    Keyword-only:
        weight: an [E, H] gate weight to use (shared, not copied); default: nn.Linear's init.
        renormalize, weights_dtype: as ``TopKRouter``.
        top_p: dynamic k (None: off).
        keep_top_k, keep_share: the baseline-preserving policy (module docstring); at most one.
        ttt_gate: adapt the gate weight too. adapt: run TTT at all (settable later).
        thermal_gain, thermal_margin_c: the energy weight's rise toward the slowdown threshold.
        max_memory_pressure: cap on the memory pressure fed to the cost lookup (< 1).
        track_stats: accumulate ``stats()`` (part of one small launch per call).
        expert_placement: None, or (rank, world_size) under expert parallelism: remote experts'
            selection cost includes the all_to_all (module docstring); E must be a multiple of
            world_size, and the cost model needs an all_to_all curve for world_size (> 1).
        expert_placement_bytes_per_rank: the all_to_all message size (bytes each rank sends) at
            which the curve's slope is read; default 8192 tokens' rows, 8192 * d_model * 2.
        expert_weights: "bf16", or "fp8" for FP8 experts (``FusedMoE.quantize_fp8``): which table op
            costs an expert (``swiglu_ffn``, or ``expert_ffn_fp8``, which the table must have).
        device, dtype: of a new weight.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, kernel_cost_model: KernelCostModel,
                 objective_weights: "dict | None" = None, ttt_update_frequency: int = 128, ttt_chunk_size: int = 512,
                 energy_aware_lr: float = 1e-4, muon_enabled: bool = False, monitor: "HardwareMonitor | None" = None,
                 *, weight: "torch.Tensor | None" = None, renormalize: bool = True, weights_dtype=None,
                 top_p: "float | None" = None, keep_top_k: "int | None" = None, keep_share: "float | None" = None,
                 ttt_gate: bool = False, adapt: bool = True, thermal_gain: float = 1.0, thermal_margin_c: float = 15.0,
                 max_memory_pressure: float = 0.9, track_stats: bool = True,
                 expert_placement: "tuple | None" = None, expert_placement_bytes_per_rank: "int | None" = None,
                 expert_weights: str = "bf16", device=None, dtype: "torch.dtype | None" = None):
        d_model, num_experts, top_k, ttt_update_frequency, ttt_chunk_size = check_sizes(
            d_model=d_model, num_experts=num_experts, top_k=top_k, ttt_update_frequency=ttt_update_frequency,
            ttt_chunk_size=ttt_chunk_size)
        super().__init__(gate_weight(weight, d_model, num_experts, device, dtype), top_k, renormalize, weights_dtype)
        self.objective_weights = check_objective_weights(objective_weights)
        muon_enabled, ttt_gate, track_stats = (check_bool(name, value) for name, value in (
            ("muon_enabled", muon_enabled), ("ttt_gate", ttt_gate), ("track_stats", track_stats)))
        if not isinstance(expert_weights, str) or expert_weights not in EXPERT_COST_OPS:
            raise ValueError(f"expert_weights must be one of {sorted(EXPERT_COST_OPS)}, got {expert_weights!r}")
        self.cost_op = EXPERT_COST_OPS[expert_weights]
        kernel_cost_model = cost_model_at(kernel_cost_model, d_model, self.cost_op)
        check_hyperparameters(energy_aware_lr, top_p, thermal_gain, thermal_margin_c, max_memory_pressure)
        if muon_enabled and not ttt_gate:
            raise ValueError("muon_enabled updates the gate weight: it needs ttt_gate=True")
        if muon_enabled and not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"muon_enabled needs torch.optim.Muon, which torch {torch.__version__} lacks "
                               "(it exists from torch 2.9)")
        self.d_model = d_model
        self.kernel_cost_model = kernel_cost_model
        self.ttt_update_frequency, self.ttt_chunk_size = ttt_update_frequency, ttt_chunk_size
        self.energy_aware_lr, self.muon_enabled, self.ttt_gate = energy_aware_lr, muon_enabled, ttt_gate
        self.top_p, self.adapt, self.track_stats = top_p, adapt, track_stats
        self.keep_top_k, self.keep_share = check_keep(keep_top_k, keep_share, top_k)
        self.thermal_gain, self.thermal_margin_c = thermal_gain, thermal_margin_c
        self.max_memory_pressure = max_memory_pressure
        if monitor is not None and not isinstance(monitor, HardwareMonitor):
            raise TypeError(f"monitor must be a router.HardwareMonitor or None, got {type(monitor).__name__}")
        self.monitor = monitor
        if monitor is not None:
            monitor.warn_unavailable()
        thermal = kernel_cost_model.table.get("thermal") or {}
        self.slowdown_temp_c = thermal.get("slowdown_temp_c") or (monitor.slowdown_temp_c if self.monitoring else None)
        self.expert_placement = check_placement(expert_placement, num_experts)
        self._extra_cost_host = placement_extra_cost(kernel_cost_model, self.expert_placement, num_experts, d_model,
                                                      expert_placement_bytes_per_rank)
        self._device_tables()
        self._register_state()
        self._reset_host_counters()

    @classmethod
    def from_router(cls, router: TopKRouter, kernel_cost_model: KernelCostModel,
                    **kwargs: Any) -> "EnergyAwareTTTRouter":
        """Wrap a ``TopKRouter`` (e.g. a patched HF model's ``layer.gate``), sharing its gate weight."""
        check_topk_router(router)
        num_experts, d_model = router.weight.shape
        return cls(d_model, num_experts, router.top_k, kernel_cost_model, weight=router.weight,
                   renormalize=router.renormalize, weights_dtype=router.weights_dtype, **kwargs)

    def _register_state(self):
        E, device = self.num_experts, self.weight.device
        # not persistent: a patched model's state_dict keeps exactly the HF block's keys
        self.register_buffer("bias_offsets", torch.zeros(E, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("hardware_state", torch.full((3,), math.nan, device=device), persistent=False)
        self.register_buffer("_stats", torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("_window", torch.zeros(2, E, device=device), persistent=False)  # tokens, batches run
        self._register_ring()

    def _reset_host_counters(self):
        self._tokens_since_update = 0
        self._reset_ttt_accounting()

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.cuda()``/``.half()``: the cost table follows the weight's device, and the router's
        own state stays float32 (a bf16 counter stops counting at 256)."""
        super()._apply(fn, *args, **kwargs)
        for name in ("bias_offsets", "hardware_state", "_window"):
            setattr(self, name, getattr(self, name).float())
        self._device_tables()
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple:
        check_tensor("hidden_states", hidden_states, ndim=2)
        check_dim("hidden_states", hidden_states, 1, self.d_model, "d_model")
        check_same_dtype_device(hidden_states=hidden_states, weight=self.weight)
        check_selection_bias(self.selection_bias, self.num_experts, self.weight.device)
        adapt = self.adapt and self.adaptive
        adapting = adapt and not capturing(hidden_states)
        if self.monitoring and self.cost_weighted and not self._reads_host_state:
            self.hardware_state.copy_(self.monitor.host_state, non_blocking=True)
        if adapting and self.update_due():
            self.ttt_step()  # before routing this batch: the update sees past batches only
        router_logits = F.linear(hidden_states, self.weight)  # NaN/+Inf logits: -inf in the routing kernel
        plain_ids, nan_tokens, routing = self._route(router_logits)
        weights = self._gate_weights(router_logits, routing.topk_weights, routing.topk_ids)
        window = adapt and self.cost_weighted
        if self.track_stats or window:
            routing_tallies(plain_ids, routing.topk_ids, weights.detach(), nan_tokens, self.num_experts,
                            stats=self._stats if self.track_stats else None,
                            window=self._window if window else None)
        if adapting:
            self.note_tokens(hidden_states.shape[0])
        if adapt and self.ttt_gate:
            self._write_ring(hidden_states.detach(), routing.topk_ids)
        if self.weights_dtype == "logits":
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, routing.topk_ids

    @property
    def adapt(self) -> bool:
        """Run test-time training at all (``router.adapt = False`` freezes it; a bool)."""
        return self._adapt

    @adapt.setter
    def adapt(self, value: bool) -> None:
        self._adapt = check_bool("adapt", value)

    @property
    def keeps(self) -> bool:
        """Does the baseline-preserving policy route (``keep_top_k`` or ``keep_share`` set)?"""
        return self.keep_top_k is not None or self.keep_share is not None

    def _route(self, router_logits):
        """(plain ids, NaN-token count, the routing used): the policy in one launch, else plain top-k
        and, with a cost weight, the biased re-selection."""
        if self.keeps:
            routing = policy_routing(router_logits, self.top_k, fill="cost", keep_top_k=self.keep_top_k,
                                     keep_share=self.keep_share, selection_bias=self.selection_bias,
                                     renormalize=self.renormalize,
                                     cost=FillCost(self._curves, self._state(), self.bias_offsets, self._bias_knobs()))
            return routing.plain_ids, routing.nan_tokens, routing
        plain = topk_routing(router_logits, self.top_k, self.selection_bias, self.renormalize)
        routing = plain
        if self.cost_weighted:
            routing = topk_routing(router_logits, self.top_k, self.cost_bias(plain.topk_ids), self.renormalize)
        return plain.topk_ids, plain.nan_tokens, routing

    def _gate_weights(self, logits, topk_weights, topk_ids):
        weights = topk_weights
        if torch.is_grad_enabled() and logits.requires_grad:
            weights = self._differentiable_weights(logits, topk_ids)
        return weights if self.top_p is None else self._nucleus(weights)

    def _nucleus(self, weights):
        """Zero the experts past the top_p share of each token's top-k weight (dynamic k)."""
        share = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        ordered, order = share.sort(dim=-1, descending=True, stable=True)
        ahead = ordered.cumsum(-1) - ordered  # share of the higher-weight experts
        keep = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, ahead < self.top_p)
        kept = weights * keep
        if not self.renormalize:
            return kept
        return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def stats(self) -> dict:
        """The accumulated statistics as Python numbers (one device sync)."""
        summary = tally_summary(self._stats, self.top_k)  # the sync: recorded update events are done
        self._settle_update_timings()
        known_energy = self.ttt_updates == 0 or self._ttt_unpowered_s == 0
        return summary | {
            "keep_top_k": self.keep_top_k, "keep_share": self.keep_share, "max_shift": self.max_shift,
            "ttt_updates": self.ttt_updates, "ttt_time_s": self._ttt_time_s,
            "ttt_energy_j_attributed": self._ttt_energy_j if known_energy else None,
            "ttt_energy_note": ATTRIBUTED_NOTE if known_energy else
            f"unknown: no monitor power reading for {self._ttt_unpowered_s:.3g} s of updates",
            "hardware": {f: getattr(self.monitor, f) if self.monitor is not None else None for f in STATE_FIELDS},
        }

    def reset_stats(self) -> None:
        self._stats.zero_()
        self._reset_ttt_accounting()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"objective_weights={self.objective_weights}, max_shift={self.max_shift:.3g}, top_p={self.top_p}, "
                f"keep_top_k={self.keep_top_k}, keep_share={self.keep_share}, "
                f"adapt={self.adapt}, ttt_gate={self.ttt_gate}, monitoring={self.monitoring}, "
                f"expert_placement={self.expert_placement}")
