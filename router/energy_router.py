"""``EnergyAwareTTTRouter``: top-k routing biased toward experts that are cheap to run *now*.

It has ``kernels.TopKRouter``'s forward contract (hidden_states [T, H] -> router_logits [T, E],
topk_weights [T, K], topk_ids [T, K] int32), so it plugs into ``kernels.FusedMoE``.

**Cost bias.** At decode sizes an expert's cost is mostly loading its weights, paid once per
batch. Plain top-k gives each expert a load n (tokens routed to it). A token deciding about an
expert sees the load m the *other* tokens put on it (m = n - 1 for an expert the token already
picked, so a singleton expert costs its only token the full weight load). Its marginal cost is
cost(1) for m = 0 (idle: the fixed weight load) and cost(m + 1) - cost(m) for m > 0 (the
per-token cost), where cost(b) is the table op ``swiglu_ffn`` (one expert's SwiGLU FFN at b
tokens), looked up on the device at the live temperature and memory pressure. Normalised by the
fixed costs E1 = energy(1), L1 = latency(1) (unstretched, so heat and pressure show up as a
larger cost), each expert's cost score is

    c_e = w_energy * g(T) * dE_e / E1 + w_latency * dL_e / L1

and its selection bias is ``clamp(-delta * c_e / (1 + c_e) + offset_e, -delta, 0)``: an idle or
singleton expert's c is about w_energy (bias about -delta / 2 at w_energy = 1), a busy expert's
about its per-token share (a few %, bias near 0). The routing kernel adds the bias to the
softmax probabilities for *selection only*; gate weights stay the unbiased probabilities.

**The quality knob.** ``delta = 1 / quality`` is the largest router-probability gap a re-route
may cross: because every bias lies in [-delta, 0], a token drops an expert a for an expert b only
if p_a - p_b <= delta. quality = 10 keeps every swap within 0.1 of probability; larger is closer
to plain top-k. ``quality`` must be > 0 when a cost weight is set. With energy and latency weights
both 0 (and no gate adaptation) the output is exactly plain ``TopKRouter`` routing.

**Baseline-preserving policy** (``keep_top_k`` or ``keep_share``; the knob users turn). Each token
keeps its plain top ``keep_top_k`` experts, or those holding ``keep_share`` of its top-k gate
weight; its other slots go, in order, to its highest ``probability + bias`` experts among the rest,
where the bias is the cost score above computed against the *kept* experts' loads: an expert some
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

**Hardware state.** A ``router.monitor.HardwareMonitor`` caches NVML readings on its own thread;
the routing kernels read its pinned [3] buffer in place (``kernels.pinned_state``: no copy, and a
CUDA-graph replay sees the live reading) and never call NVML. Where this Triton cannot read pinned
memory (probed once per device) the forward copies the buffer to the device instead (non-blocking,
re-read at every replay). The energy weight rises toward the GPU's NVML
slowdown threshold T_slow (the table's, else the meter's): g(T) = 1 + thermal_gain *
clamp((T - (T_slow - thermal_margin_c)) / thermal_margin_c, 0, 1), on the device; without a known
threshold g = 1. Memory-bandwidth utilisation (clamped to ``max_memory_pressure``) is the cost
lookup's memory pressure. Until the first reading the temperature is the table's coolest
calibrated point and the pressure 0.

**Test-time training (TTT).** Every ``ttt_update_frequency`` tokens (counted on the host from
shapes) the forward first updates the router from the batches routed *before* it (causal):
- bias offsets, a DeepSeek-style sign step of ``energy_aware_lr``: over the window since the last
  update, each expert that ran gets its amortised cost per routed token (the cost score at its
  mean load when active, divided by that load); experts cheaper than the token-weighted mean step
  up (attract tokens), dearer ones step down. The target is lower cost per token, not load
  balance; offsets stay in [-delta, delta] and the bias in [-delta, 0], so the quality bound holds.
- with ``ttt_gate=True``, the gate weight takes one optimiser step (Muon for the 2-D weight with
  ``muon_enabled``, else Adam, at ``energy_aware_lr``) on a self-distillation objective over the
  last ``ttt_chunk_size`` routed tokens: -log of the probability mass the gate puts on the expert
  set the energy-aware selection chose, so plain probabilities drift toward cheap routing and
  later batches need smaller shifts. Tokens with non-finite hidden states are left out.
TTT runs in eval mode and under ``torch.no_grad``/``inference_mode`` (it is test-time training);
set ``router.adapt = False`` to freeze it. The window and the gate's ring of hidden states (its
write position and fill on the device) are device work in the forward, so a captured forward keeps
them; an update never runs inside a captured forward. Between replays, ``ttt_step()`` applies one,
or a caller replays a graph of ``ttt_update()`` (the update's device work, no host sync; Adam is
capturable on a GPU) and counts it with ``note_update()``. Updates are counted and timed (CUDA events on a GPU); their
energy is *attributed* (monitor board power x update time), not metered.

**Expert placement.** Under expert parallelism (``expert_placement=(rank, world_size)``, experts
owned contiguously: rank r holds [r*E/W, (r+1)*E/W)) a token routed to a remote expert is sent
there and back by all_to_all. Each remote expert's selection cost then includes, per routed
token, the cost of one remote byte times the token's row (d_model bf16 values) times 2
(dispatch and combine); local experts add nothing. The remote byte's cost comes from the
table's ``all_to_all`` curve slope at the layer's message size (``KernelCostModel.
comm_cost_per_byte`` at ``expert_placement_bytes_per_rank``), which is per byte of every rank's
message with energy summed over the W GPUs: energy / (W-1) and latency x W / (W-1).
This [2, E] ``extra_cost`` (energy J, latency ms per token) is built once, on the host, and
follows the router's device; the bias scores it against a token's marginal compute at the
batch's mean expert load (``kernels.cost_bias``), so it weighs as a per-token cost. It is a
per-expert upper bound of the marginal cost: a token already sent to a rank for another expert
costs nothing more to send there again.

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
import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from calibration.energy import DeferredTimer
from costmodel.ops import BYTES_PER_ELEMENT
from kernels._validate import FLOAT_DTYPES, check_dim, check_int, check_same_dtype_device, check_tensor
from kernels.cost_bias import (cost_curves, energy_weight_reference, expert_cost_bias, expert_cost_reference,
                               ttt_offset_step)
from kernels.moe_layer import TopKRouter
from kernels.pinned_state import readable_in_place
from kernels.policy_routing import FillCost, policy_routing
from kernels.routing import check_selection_bias, topk_routing
from kernels.routing_stats import STAT_FIELDS, routing_tallies, tally_summary
from router.monitor import STATE_FIELDS, HardwareMonitor

COST_OP = "swiglu_ffn"
COMM_OP = "all_to_all"
DEFAULT_MESSAGE_TOKENS = 8192  # tokens per rank in one all_to_all: the default message size's rows
OBJECTIVE_KEYS = ("energy", "latency", "quality")
DEFAULT_OBJECTIVE_WEIGHTS = {"energy": 1.0, "latency": 0.0, "quality": 1.0}
ATTRIBUTED_NOTE = "attributed, not metered: monitor board power x the updates' own GPU time"


class EnergyAwareTTTRouter(TopKRouter):
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
        device, dtype: of a new weight.
    """

    def __init__(self, d_model, num_experts, top_k, kernel_cost_model, objective_weights=None,
                 ttt_update_frequency=128, ttt_chunk_size=512, energy_aware_lr=1e-4, muon_enabled=False,
                 monitor=None, *, weight=None, renormalize=True, weights_dtype=None, top_p=None, keep_top_k=None,
                 keep_share=None, ttt_gate=False, adapt=True, thermal_gain=1.0, thermal_margin_c=15.0, max_memory_pressure=0.9, track_stats=True,
                 expert_placement=None, expert_placement_bytes_per_rank=None, device=None, dtype=None):
        d_model, num_experts, top_k, ttt_update_frequency, ttt_chunk_size = _check_sizes(
            d_model=d_model, num_experts=num_experts, top_k=top_k, ttt_update_frequency=ttt_update_frequency,
            ttt_chunk_size=ttt_chunk_size)
        super().__init__(_gate_weight(weight, d_model, num_experts, device, dtype), top_k, renormalize, weights_dtype)
        self.objective_weights = _check_objective_weights(objective_weights)
        kernel_cost_model = _cost_model_at(kernel_cost_model, d_model)
        _check_hyperparameters(energy_aware_lr, top_p, thermal_gain, thermal_margin_c, max_memory_pressure)
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
        self.keep_top_k, self.keep_share = _check_keep(keep_top_k, keep_share, top_k)
        self.thermal_gain, self.thermal_margin_c = thermal_gain, thermal_margin_c
        self.max_memory_pressure = max_memory_pressure
        if monitor is not None and not isinstance(monitor, HardwareMonitor):
            raise TypeError(f"monitor must be a router.HardwareMonitor or None, got {type(monitor).__name__}")
        self.monitor = monitor
        if monitor is not None:
            monitor.warn_unavailable()
        thermal = kernel_cost_model.table.get("thermal") or {}
        self.slowdown_temp_c = thermal.get("slowdown_temp_c") or (monitor.slowdown_temp_c if self.monitoring else None)
        self.expert_placement = _check_placement(expert_placement, num_experts)
        self._extra_cost_host = _placement_extra_cost(kernel_cost_model, self.expert_placement, num_experts, d_model,
                                                      expert_placement_bytes_per_rank)
        self._device_tables()
        self._register_state()
        self._reset_host_counters()

    @classmethod
    def from_router(cls, router, kernel_cost_model, **kwargs):
        """Wrap a ``TopKRouter`` (e.g. a patched HF model's ``layer.gate``), sharing its gate weight."""
        num_experts, d_model = router.weight.shape
        return cls(d_model, num_experts, router.top_k, kernel_cost_model, weight=router.weight,
                   renormalize=router.renormalize, weights_dtype=router.weights_dtype, **kwargs)

    @property
    def cost_weighted(self):
        """Does any cost weight move the selection (False: exactly plain top-k)?"""
        return self.objective_weights["energy"] > 0 or self.objective_weights["latency"] > 0

    @property
    def adaptive(self):
        """Is there anything for test-time training to update?"""
        return self.cost_weighted or self.ttt_gate

    @property
    def max_shift(self):
        """delta: the largest probability gap a re-route may cross (1 / quality)."""
        return 1.0 / self.objective_weights["quality"] if self.cost_weighted else 0.0

    @property
    def monitoring(self):
        return self.monitor is not None and self.monitor.available

    def _register_state(self):
        E, device = self.num_experts, self.weight.device
        # not persistent: a patched model's state_dict keeps exactly the HF block's keys
        self.register_buffer("bias_offsets", torch.zeros(E, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("hardware_state", torch.full((3,), math.nan, device=device), persistent=False)
        self.register_buffer("_stats", torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("_window", torch.zeros(2, E, device=device), persistent=False)  # tokens, batches run
        if self.ttt_gate:
            self.register_buffer("_ring_hidden", torch.zeros(self.ttt_chunk_size, self.d_model, device=device,
                                                             dtype=self.weight.dtype), persistent=False)
            self.register_buffer("_ring_ids", torch.zeros(self.ttt_chunk_size, self.top_k, device=device,
                                                          dtype=torch.int32), persistent=False)
            self.register_buffer("_ring_next", torch.zeros((), dtype=torch.long, device=device), persistent=False)
            self.register_buffer("_ring_filled", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._gate_optimizer = None

    def _reset_host_counters(self):
        self._tokens_since_update = 0
        self._reset_ttt_accounting()

    def _reset_ttt_accounting(self):
        self.ttt_updates = 0
        self._update_timer = DeferredTimer()  # tagged with the monitor's power at each update
        self._ttt_time_s = self._ttt_energy_j = self._ttt_unpowered_s = 0.0

    def _apply(self, fn, *args, **kwargs):
        """``.to()``/``.cuda()``/``.half()``: the cost table follows the weight's device, and the router's
        own state stays float32 (a bf16 counter stops counting at 256)."""
        super()._apply(fn, *args, **kwargs)
        for name in ("bias_offsets", "hardware_state", "_window"):
            setattr(self, name, getattr(self, name).float())
        self._device_tables()
        return self

    def _device_tables(self):
        """The bias kernels' cost curves and the placement's extra cost, on the weight's device."""
        device = self.weight.device
        curves = cost_curves(self.kernel_cost_model.device_curves(COST_OP), device)
        if self.slowdown_temp_c is not None:  # the table's, else the monitor's (NVML) threshold
            curves = dataclasses.replace(curves, slowdown_temp_c=float(self.slowdown_temp_c))
        self._curves = curves
        # [2, E] energy_j, latency_ms per routed token beyond compute (None: no placement)
        self.extra_cost = None if self._extra_cost_host is None else self._extra_cost_host.to(device)
        self._no_state = torch.full((3,), math.nan, device=device)  # no monitor: cost model alone
        self._reads_host_state = self.monitoring and readable_in_place(self.monitor.host_state, device)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, hidden_states):
        check_tensor("hidden_states", hidden_states, ndim=2)
        check_dim("hidden_states", hidden_states, 1, self.d_model, "d_model")
        check_same_dtype_device(hidden_states=hidden_states, weight=self.weight)
        check_selection_bias(self.selection_bias, self.num_experts, self.weight.device)
        adapt = self.adapt and self.adaptive
        adapting = adapt and not _capturing(hidden_states)
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
    def keeps(self):
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

    def expert_cost(self, batch_sizes):
        """(energy_j, latency_ms) of one expert at ``batch_sizes`` tokens (a float tensor) under the
        cached hardware state, as the bias kernels see it."""
        return expert_cost_reference(self._curves, self._state(), batch_sizes, self.max_memory_pressure)

    def energy_weight(self):
        """w_energy * g(T) at the cached temperature, as the bias kernels apply it (a [1] device tensor)."""
        return energy_weight_reference(self._curves, self._state(), self.objective_weights["energy"],
                                       self.thermal_gain, self.thermal_margin_c)

    def _state(self):
        """The [3] state the kernels read: the monitor's buffer in place, its copy, or NaNs (no monitor)."""
        if not self.monitoring:
            return self._no_state
        return self.monitor.host_state if self._reads_host_state else self.hardware_state

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

    def cost_bias(self, plain_ids):
        """The [E] selection bias for a batch whose plain top-k chose ``plain_ids`` [T, K]: one
        launch of ``kernels.cost_bias.expert_cost_bias`` on the cached hardware state."""
        return expert_cost_bias(plain_ids, self._curves, self._state(), self.bias_offsets, **self._bias_knobs())

    def _bias_knobs(self):
        return {"energy_weight": self.objective_weights["energy"], "latency_weight": self.objective_weights["latency"],
                "max_shift": self.max_shift, "thermal_gain": self.thermal_gain,
                "thermal_margin_c": self.thermal_margin_c, "max_memory_pressure": self.max_memory_pressure,
                "extra_cost": self.extra_cost}

    def _write_ring(self, hidden_states, topk_ids):
        """The gate's ring of the last ``ttt_chunk_size`` tokens: write position and fill on the device."""
        n = min(hidden_states.shape[0], self.ttt_chunk_size)
        slots = (self._ring_next + torch.arange(n, device=hidden_states.device)) % self.ttt_chunk_size
        self._ring_hidden.index_copy_(0, slots, hidden_states[-n:])
        self._ring_ids.index_copy_(0, slots, topk_ids[-n:])
        self._ring_next.add_(n).remainder_(self.ttt_chunk_size)
        self._ring_filled.add_(n).clamp_(max=self.ttt_chunk_size)

    # ---- test-time training --------------------------------------------------------------------

    def ttt_step(self):
        """One timed, counted test-time update from the batches routed since the last one (outside capture)."""
        if _capturing(self.weight):
            raise RuntimeError("ttt_step() cannot run inside CUDA-graph capture: call it between replays")
        power_w = self.monitor.power_w if self.monitoring else None
        with self._update_timer.time(self.weight.is_cuda, power_w):
            self.ttt_update()
        self.note_update()

    def ttt_update(self):
        """The update's device work (no host sync, capturable): the offsets' step and the gate's step."""
        with torch.inference_mode(False), torch.no_grad():
            if self.cost_weighted:
                self._bias_step()
            if self.ttt_gate:
                self._gate_step()

    def update_due(self):
        """Have ``ttt_update_frequency`` tokens been routed since the last update (host count)?"""
        return self.adapt and self.adaptive and self._tokens_since_update >= self.ttt_update_frequency

    def note_tokens(self, count):
        """Count routed tokens (a caller replaying a captured forward counts its replays here)."""
        self._tokens_since_update += check_int("count", count, 0)

    def note_update(self):
        """Count an update (a caller replaying a captured ``ttt_update`` counts its replays here)."""
        self._tokens_since_update = 0
        self.ttt_updates += 1

    def _bias_step(self):
        ttt_offset_step(self._window, self._curves, self._state(), self.bias_offsets, lr=self.energy_aware_lr,
                        **self._bias_knobs())

    def _gate_step(self):
        optimizer = self._optimizer()
        user_grad, self.weight.grad = self.weight.grad, self._gate_gradient()
        optimizer.step()
        self.weight.grad = user_grad  # leave the caller's own gradient in place

    def _gate_gradient(self):
        """d/dW of the mean over the ring's filled, finite tokens of -log(softmax mass on the chosen set).

        In closed form (no autograd graph: eager TTT is host-bound): with p the softmax of the
        logits and q = p on the chosen experts renormalised to 1 (0 elsewhere), dloss/dlogits =
        (p - q) / n per token, and the weight's gradient is its product with the hidden states."""
        hidden = self._ring_hidden
        filled = torch.arange(self.ttt_chunk_size, device=hidden.device)[:, None] < self._ring_filled  # [N, 1]
        finite = torch.isfinite(hidden).all(1, keepdim=True) & filled
        hidden = torch.where(finite, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        probs = F.linear(hidden, self.weight.detach()).float().softmax(-1)  # [N, E]
        ids = self._ring_ids.long()  # -1: an empty slot (the policy's), no expert
        chosen = torch.zeros_like(probs).scatter_add_(1, ids.clamp_min(0), (ids >= 0).float()).clamp_max(1) * probs
        scale = finite / finite.sum().clamp_min(1)
        d_logits = (probs - chosen / chosen.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)) * scale
        return (d_logits.T @ hidden.float()).to(self.weight.dtype)

    def _optimizer(self):
        if self._gate_optimizer is None:
            lr = self.energy_aware_lr
            self._gate_optimizer = torch.optim.Muon([self.weight], lr=lr, weight_decay=0.0) if self.muon_enabled \
                else torch.optim.Adam([self.weight], lr=lr, fused=self.weight.is_cuda,  # fused: one launch
                                      capturable=self.weight.is_cuda)
        return self._gate_optimizer

    def _settle_update_timings(self):
        for seconds, power_w in self._update_timer.settle():
            self._ttt_time_s += seconds
            if power_w is None:
                self._ttt_unpowered_s += seconds
            else:
                self._ttt_energy_j += power_w * seconds

    # ---- statistics ----------------------------------------------------------------------------

    def stats(self):
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

    def reset_stats(self):
        self._stats.zero_()
        self._reset_ttt_accounting()

    def extra_repr(self):
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"objective_weights={self.objective_weights}, max_shift={self.max_shift:.3g}, top_p={self.top_p}, "
                f"keep_top_k={self.keep_top_k}, keep_share={self.keep_share}, "
                f"adapt={self.adapt}, ttt_gate={self.ttt_gate}, monitoring={self.monitoring}, "
                f"expert_placement={self.expert_placement}")


def _capturing(tensor):
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_sizes(**sizes):
    """Each size as a Python int >= 1 (numpy integers too)."""
    return [check_int(name, value, 1) for name, value in sizes.items()]


def _finite_number(name, value, low, low_open=False, high=math.inf, high_open=True):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (low_open and value == low) or value > high or (high_open and value == high):
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")


def _check_keep(keep_top_k, keep_share, top_k):
    """(keep_top_k, keep_share): at most one set; keep_top_k in [1, top_k], keep_share in (0, 1]."""
    if keep_top_k is not None and keep_share is not None:
        raise ValueError(f"keep_top_k and keep_share are two forms of one knob: give at most one, got "
                         f"{keep_top_k!r} and {keep_share!r}")
    if keep_top_k is not None:
        keep_top_k = check_int("keep_top_k", keep_top_k, 1, top_k)
    if keep_share is not None:
        _finite_number("keep_share", keep_share, 0.0, low_open=True, high=1.0, high_open=False)
        keep_share = float(keep_share)
    return keep_top_k, keep_share


def _check_objective_weights(objective_weights):
    weights = dict(DEFAULT_OBJECTIVE_WEIGHTS)
    if objective_weights is not None:
        unknown = set(objective_weights) - set(OBJECTIVE_KEYS)
        if unknown:
            raise ValueError(f"objective_weights has unknown keys {sorted(unknown)}; expected {list(OBJECTIVE_KEYS)}")
        weights.update(objective_weights)
    for key, value in weights.items():
        _finite_number(f"objective_weights[{key!r}]", value, 0.0)
    if (weights["energy"] > 0 or weights["latency"] > 0) and weights["quality"] == 0:
        raise ValueError("objective_weights['quality'] must be > 0 when a cost weight is set: the largest "
                         "probability gap a re-route may cross is 1 / quality")
    return {k: float(v) for k, v in weights.items()}


def _cost_model_at(model, d_model):
    """``model`` costing experts of ``d_model``: as given when its dims have that d_model, else
    at d_model with its d_ff scaled alike (the tile model carries the table there; a warning says
    how to give the experts' real d_ff)."""
    if COST_OP not in getattr(model, "ops", ()):
        raise ValueError(f"kernel_cost_model has no {COST_OP!r} op (one expert's SwiGLU FFN), which the router's "
                         f"cost bias reads; its table has {list(getattr(model, 'ops', ()))}")
    if model.dims.d_model == d_model:
        return model
    d_ff = max(1, round(model.dims.d_ff * d_model / model.dims.d_model))
    n_heads = model.dims.n_heads if d_model % model.dims.n_heads == 0 else 1  # unused by the expert's cost
    warnings.warn(f"kernel_cost_model is at d_model={model.dims.d_model}; the router costs its experts at "
                  f"d_model={d_model}, d_ff={d_ff} (scaled alike, modelled). For the experts' real size pass "
                  f"kernel_cost_model.with_dims(d_model={d_model}, d_ff=<their intermediate size>)", UserWarning,
                  stacklevel=3)
    return model.with_dims(d_model=d_model, d_ff=d_ff, n_heads=n_heads)


def _check_placement(placement, num_experts):
    """(rank, world_size) with E split evenly over the ranks, or None."""
    if placement is None:
        return None
    if not isinstance(placement, (tuple, list)) or len(placement) != 2 or \
            any(isinstance(v, bool) or not isinstance(v, int) for v in placement):
        raise ValueError(f"expert_placement must be None or (rank, world_size) ints, got {placement!r}")
    rank, world_size = placement
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expert_placement (rank, world_size) needs world_size >= 1 and 0 <= rank < world_size, "
                         f"got {placement!r}")
    if num_experts % world_size:
        raise ValueError(f"expert_placement: num_experts ({num_experts}) must be a multiple of world_size "
                         f"({world_size}); each rank owns E / world_size contiguous experts")
    return rank, world_size


def _placement_extra_cost(model, placement, num_experts, d_model, bytes_per_rank):
    """[2, E] float32 on the host: energy_j and latency_ms per routed token that each expert adds
    beyond its compute (the all_to_all there and back for a remote one), or None without a placement."""
    if placement is None:
        if bytes_per_rank is not None:
            raise ValueError("expert_placement_bytes_per_rank sets the all_to_all message size: it needs "
                             "expert_placement")
        return None
    if bytes_per_rank is None:
        bytes_per_rank = DEFAULT_MESSAGE_TOKENS * d_model * BYTES_PER_ELEMENT
    bytes_per_rank = check_int("expert_placement_bytes_per_rank", bytes_per_rank, 1)
    rank, world_size = placement
    extra = torch.zeros(2, num_experts, dtype=torch.float32)
    if world_size == 1:  # every expert is local
        return extra
    try:
        per_byte = model.comm_cost_per_byte(COMM_OP, bytes_per_rank, world_size)
    except ValueError as exc:
        raise ValueError(f"expert_placement {placement!r}: {exc}") from exc
    # The curve's slope is per byte of *every* rank's message, energy summed over all W GPUs: one
    # more byte from each rank moves W-1 remote bytes in all (energy / (W-1) per remote byte),
    # and each rank's remote share, (W-1)/W of its message, sets the time (latency x W/(W-1)).
    energy_j_per_byte, latency_ms_per_byte = per_byte
    remote_byte = torch.tensor([energy_j_per_byte / (world_size - 1), latency_ms_per_byte * world_size /
                                (world_size - 1)], dtype=torch.float64)
    extra[:] = remote_byte[:, None] * (2 * d_model * BYTES_PER_ELEMENT)  # the token's row, dispatch and combine
    owned = num_experts // world_size
    extra[:, rank * owned:(rank + 1) * owned] = 0.0
    return extra


def _check_hyperparameters(energy_aware_lr, top_p, thermal_gain, thermal_margin_c, max_memory_pressure):
    _finite_number("energy_aware_lr", energy_aware_lr, 0.0, low_open=True)
    if top_p is not None:
        _finite_number("top_p", top_p, 0.0, low_open=True, high=1.0, high_open=False)
    _finite_number("thermal_gain", thermal_gain, 0.0)
    _finite_number("thermal_margin_c", thermal_margin_c, 0.0, low_open=True)
    _finite_number("max_memory_pressure", max_memory_pressure, 0.0, high=1.0)


def _gate_weight(weight, d_model, num_experts, device, dtype):
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if weight is None:
        weight = torch.empty(num_experts, d_model, device=device, dtype=dtype or torch.float32)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default init
        return weight
    check_tensor("weight", weight, ndim=2, kernel_device=False)
    if tuple(weight.shape) != (num_experts, d_model):
        raise ValueError(f"weight must be [num_experts, d_model] = [{num_experts}, {d_model}], "
                         f"got {tuple(weight.shape)}")
    if device is not None or dtype is not None:
        raise ValueError("device and dtype are for a new weight; a given weight keeps its own")
    return weight
