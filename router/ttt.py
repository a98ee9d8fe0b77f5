"""The energy-aware router's test-time training: the offsets' step and the gate's step.

Every ``ttt_update_frequency`` tokens (counted on the host from
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
"""
import torch
import torch.nn.functional as F

from calibration.energy import DeferredTimer
from kernels.cost_bias import ttt_offset_step
from kernels.validate import check_int


class RouterTTT:
    """The test-time part of ``router.EnergyAwareTTTRouter`` (a mixin: its state lives on the router).

    Needs the cost part (``router.cost.CostSelection``), ``adapt``, ``ttt_gate``,
    ``ttt_update_frequency``, ``ttt_chunk_size``, ``energy_aware_lr``, ``muon_enabled`` and the
    ``_window`` buffer."""

    @property
    def adaptive(self) -> bool:
        """Is there anything for test-time training to update?"""
        return self.cost_weighted or self.ttt_gate

    def _register_ring(self):
        """The gate's ring of hidden states and chosen ids (with ``ttt_gate``), and no optimiser yet."""
        device = self.weight.device
        if self.ttt_gate:
            self.register_buffer("_ring_hidden", torch.zeros(self.ttt_chunk_size, self.d_model, device=device,
                                                             dtype=self.weight.dtype), persistent=False)
            self.register_buffer("_ring_ids", torch.zeros(self.ttt_chunk_size, self.top_k, device=device,
                                                          dtype=torch.int32), persistent=False)
            self.register_buffer("_ring_next", torch.zeros((), dtype=torch.long, device=device), persistent=False)
            self.register_buffer("_ring_filled", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._gate_optimizer = None

    def _reset_ttt_accounting(self):
        self.ttt_updates = 0
        self._update_timer = DeferredTimer()  # tagged with the monitor's power at each update
        self._ttt_time_s = self._ttt_energy_j = self._ttt_unpowered_s = 0.0

    def _write_ring(self, hidden_states, topk_ids):
        """The gate's ring of the last ``ttt_chunk_size`` tokens: write position and fill on the device."""
        n = min(hidden_states.shape[0], self.ttt_chunk_size)
        slots = (self._ring_next + torch.arange(n, device=hidden_states.device)) % self.ttt_chunk_size
        self._ring_hidden.index_copy_(0, slots, hidden_states[-n:])
        self._ring_ids.index_copy_(0, slots, topk_ids[-n:])
        self._ring_next.add_(n).remainder_(self.ttt_chunk_size)
        self._ring_filled.add_(n).clamp_(max=self.ttt_chunk_size)

    def ttt_step(self) -> None:
        """One timed, counted test-time update from the batches routed since the last one (outside capture)."""
        if capturing(self.weight):
            raise RuntimeError("ttt_step() cannot run inside CUDA-graph capture: call it between replays")
        power_w = self.monitor.power_w if self.monitoring else None
        with self._update_timer.time(self.weight.is_cuda, power_w):
            self.ttt_update()
        self.note_update()

    def ttt_update(self) -> None:
        """The update's device work (no host sync, capturable): the offsets' step and the gate's step."""
        with torch.inference_mode(False), torch.no_grad():
            if self.cost_weighted:
                self._bias_step()
            if self.ttt_gate:
                self._gate_step()

    def update_due(self) -> bool:
        """Have ``ttt_update_frequency`` tokens been routed since the last update (host count)?"""
        return self.adapt and self.adaptive and self._tokens_since_update >= self.ttt_update_frequency

    def note_tokens(self, count: int) -> None:
        """Count routed tokens (a caller replaying a captured forward counts its replays here)."""
        self._tokens_since_update += check_int("count", count, 0)

    def note_update(self) -> None:
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


def capturing(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
