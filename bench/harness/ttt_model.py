"""The transformer with test-time training: the harness's second model (``TTTLanguageModel``)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness.models import KVCache, TransformerLM
from calibration.energy import DeferredTimer
from costmodel.ops import ModelDims


def ttt_parameters(lm: TransformerLM) -> dict:
    """The parameters test-time training updates: the final norm and the last block's FFN (its
    norm and both SwiGLU weights). Nearest the loss, so an update's backward stops at the last
    block's FFN input instead of running through attention or the earlier blocks."""
    last = lm.blocks[-1]
    return {"final_norm": lm.final_norm, f"blocks.{len(lm.blocks) - 1}.ffn_norm": last.ffn_norm,
            f"blocks.{len(lm.blocks) - 1}.gate_up_proj": last.gate_up_proj,
            f"blocks.{len(lm.blocks) - 1}.down_proj": last.down_proj}


class TTTLanguageModel(nn.Module):
    """A dense ``TransformerLM`` that trains itself at test time (causal: on tokens it has seen).

    At the start of a forward, once ``ttt_update_frequency`` tokens (B x S, counted from shapes)
    have passed since the last update, it takes one gradient step on the next-token loss of the
    most recent ``ttt_chunk_size`` tokens of the earlier calls: a window of
    ``max(2, ttt_chunk_size // B)`` positions of each of the B streams (a stream is row b of every
    call with the same B; a new B starts new streams). A forward of more than
    ``ttt_update_frequency`` tokens triggers one update, not several (as ``EnergyAwareTTTRouter``).
    The window is a static [B, window] buffer with its filled length on the device (the loss skips
    positions not yet seen), so remembering a call and the update itself read nothing on the host
    and each can be captured in a CUDA graph (``bench.harness.graphs``): the forward with its
    remembering, and the update (``ttt_update``) replayed between forwards.
    The step updates ``ttt_parameters(lm)`` only (the rest is frozen) with Adam at
    ``energy_aware_lr`` (capturable on a GPU), or Muon (``torch.optim.Muon``) for the 2-D weights
    with ``muon_enabled``, on fp32 master copies: a bf16 weight would round a 1e-4 step away.
    Updates are counted and timed (CUDA events on a GPU, ``perf_counter`` on a CPU); they run
    inside the forward, so any energy window around forwards includes them. ``adapt = False``
    freezes it.
    """

    def __init__(self, lm, ttt_update_frequency=128, ttt_chunk_size=512, energy_aware_lr=1e-4, muon_enabled=False):
        super().__init__()
        if not isinstance(lm, TransformerLM) or lm.moe:
            raise ValueError("lm must be a dense TransformerLM (test-time training updates its last block's FFN)")
        for name, value in (("ttt_update_frequency", ttt_update_frequency), ("ttt_chunk_size", ttt_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(energy_aware_lr, bool) or not isinstance(energy_aware_lr, (int, float)) \
                or not math.isfinite(energy_aware_lr) or energy_aware_lr <= 0:
            raise ValueError(f"energy_aware_lr must be a positive finite number, got {energy_aware_lr!r}")
        self.lm = lm
        self.ttt_update_frequency, self.ttt_chunk_size = ttt_update_frequency, ttt_chunk_size
        self.energy_aware_lr, self.muon_enabled = energy_aware_lr, muon_enabled
        self.adapt = True
        self.ttt_params = ttt_parameters(lm)
        for p in lm.parameters():
            p.requires_grad_(False)
        for p in self.ttt_params.values():
            p.requires_grad_(True)
        self._masters = [p.detach().float().clone().requires_grad_() for p in self.ttt_params.values()]
        self._optimizers = self._build_optimizers()
        self._history = None  # [B, window] int64: the streams' most recent tokens, oldest first
        self._seen = None  # [1] int64 on the device: how many of the window's positions are filled
        self._tokens_since_update = 0
        self.reset_stats()

    def _build_optimizers(self):
        lr, on_gpu = self.energy_aware_lr, self._masters[0].is_cuda  # fused Adam: one launch per step
        if not self.muon_enabled:
            return [torch.optim.Adam(self._masters, lr=lr, fused=on_gpu, capturable=on_gpu)]
        matrices = [m for m in self._masters if m.dim() == 2]
        return [torch.optim.Muon(matrices, lr=lr, weight_decay=0.0),  # Muon takes 2-D weights only
                torch.optim.Adam([m for m in self._masters if m.dim() != 2], lr=lr, fused=on_gpu,
                                 capturable=on_gpu)]

    @property
    def dims(self) -> ModelDims:
        return self.lm.dims

    @property
    def optimizer_name(self) -> str:
        return "muon (2-D) + adam (norms)" if self.muon_enabled else "adam"

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.update_due():
            self.ttt_step()  # before this call's tokens are seen: the update is causal
        logits = self.lm(tokens, cache)
        self.remember(tokens)
        return logits

    def update_due(self) -> bool:
        """Has ``ttt_update_frequency`` tokens' worth of calls passed since the last update (host count)?"""
        return self.adapt and self._history is not None and self._tokens_since_update >= self.ttt_update_frequency

    def window_length(self, batch_size: int) -> int:
        return min(max(2, self.ttt_chunk_size // batch_size), self.dims.seq_len + 1)  # seq_len inputs + 1 target

    def remember(self, tokens: torch.Tensor) -> None:
        """Shift a call's [B, S] tokens into the window (device work only; a new B starts new streams)."""
        self.note_tokens(tokens.numel())
        B, S = tokens.shape
        keep = self.window_length(B)
        if self._history is None or self._history.shape[0] != B:
            self._history = torch.zeros(B, keep, dtype=torch.long, device=tokens.device)
            self._seen = torch.zeros(1, dtype=torch.long, device=tokens.device)
        if S >= keep:
            self._history.copy_(tokens[:, -keep:])
        else:
            self._history.copy_(torch.cat((self._history[:, S:], tokens), dim=1))
        self._seen.add_(S).clamp_(max=keep)

    def ttt_step(self) -> None:
        """One timed, counted update on the remembered tokens (``ttt_update`` does the work)."""
        if self._history is None:
            raise RuntimeError("test-time training needs seen tokens: call the model first")
        with self._timer.time(self.lm.embed.is_cuda):
            self.ttt_update()
        self.note_update()

    def note_tokens(self, count: int) -> None:
        """Count tokens seen (a caller replaying a captured forward counts its replays here)."""
        self._tokens_since_update += count

    def note_update(self) -> None:
        """Count an update (a caller replaying a captured ``ttt_update`` counts its replays here)."""
        self._tokens_since_update = 0
        self.ttt_updates += 1

    def ttt_update(self) -> None:
        """The update's device work, no host sync: the next-token loss over the window's filled
        positions, its gradient for ``ttt_parameters``, the optimiser step on the masters, and the
        masters copied into the model's weights."""
        params = list(self.ttt_params.values())
        with torch.inference_mode(False), torch.enable_grad():
            stream = self._history.clone()  # a normal tensor even if it was recorded under inference_mode
            logits = self.lm(stream[:, :-1])
            per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), stream[:, 1:].reshape(-1),
                                        reduction="none").view(stream.shape[0], -1)
            targets = torch.arange(per_token.shape[1], device=stream.device)
            seen = (targets >= stream.shape[1] - self._seen).float()  # [window - 1]: inputs and targets both seen
            loss = (per_token * seen).sum() / (seen.sum() * stream.shape[0]).clamp_min(1.0)
            grads = torch.autograd.grad(loss, params)
            for master, grad in zip(self._masters, grads):
                master.grad = grad.float()
            for optimizer in self._optimizers:
                optimizer.step()
            with torch.no_grad():
                for p, master in zip(params, self._masters):
                    p.copy_(master)

    def stats(self) -> dict:
        """Updates since ``reset_stats`` and their total time in s (waits for the last update on a GPU)."""
        self._ttt_time_s += sum(seconds for seconds, _ in self._timer.settle())
        return {"ttt_updates": self.ttt_updates, "ttt_time_s": self._ttt_time_s, "optimizer": self.optimizer_name,
                "ttt_parameters": list(self.ttt_params),
                "ttt_parameter_count": sum(p.numel() for p in self.ttt_params.values())}

    def reset_stats(self) -> None:
        self.ttt_updates, self._ttt_time_s = 0, 0.0
        self._timer = DeferredTimer()

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        return self.lm.new_cache(batch_size, capacity)

    def parameter_counts(self) -> dict:
        return self.lm.parameter_counts()

    def cost_plan(self, batch_size: int) -> list:
        return self.lm.cost_plan(batch_size)

    def decode_cost_plan(self, batch_size: int) -> list:
        return self.lm.decode_cost_plan(batch_size)
