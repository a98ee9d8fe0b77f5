"""The decode step's weight-read floor: the bytes one step must read over the measured copy bandwidth."""
import statistics
from typing import TYPE_CHECKING

import torch

from bench.harness.ttt_model import TTTLanguageModel
from calibration.energy import event_times_ms

if TYPE_CHECKING:  # measure imports this module
    from bench.harness.measure import DeviceEnv

COPY_BYTES = 1 << 30


def weight_read_floor(env: "DeviceEnv", model: torch.nn.Module, next_tokens: torch.Tensor, latency_ms: float) -> dict:
    """The decode step's floor: bytes of the weights it touches (experts counted from one routed
    batch) over the copy bandwidth measured in this run, and the step's latency over it."""
    if env.copy_bytes_per_s is None:
        return {"floor_ms": None, "reason": f"the copy bandwidth needs a CUDA device ({env.energy_reason})"}
    lm = model.lm if isinstance(model, TTTLanguageModel) else model
    touched = touched_weight_bytes(lm, next_tokens)
    floor_ms = touched / env.copy_bytes_per_s * 1e3
    return {"weight_bytes_touched": touched, "copy_bytes_per_s": env.copy_bytes_per_s, "floor_ms": floor_ms,
            "latency_over_floor": latency_ms / floor_ms}


def touched_weight_bytes(lm: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of every weight one step over ``tokens`` [B, 1] reads: all dense weights (the embedding's
    rows for these tokens only) and, per MoE layer, the distinct experts its router picks (from one
    eager forward of the same tokens, without their context: the same count, statistically)."""
    def bytes_of(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()
    skip = {id(lm.embed)} | {id(p) for b in lm.blocks if lm.moe
                             for p in (b.moe.experts.gate_up_proj, b.moe.experts.down_proj)}
    total = sum(bytes_of(p) for p in lm.parameters() if id(p) not in skip)
    total += tokens.unique().numel() * lm.embed.shape[1] * lm.embed.element_size()
    if not lm.moe:
        return total
    picked = []
    hooks = [b.moe.gate.register_forward_hook(lambda _m, _i, out: picked.append(out[2])) for b in lm.blocks]
    try:
        with torch.no_grad():
            lm(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    for block, ids in zip(lm.blocks, picked):
        experts = block.moe.experts
        per_expert = (bytes_of(experts.gate_up_proj) + bytes_of(experts.down_proj)) // experts.gate_up_proj.shape[0]
        total += ids.unique().numel() * per_expert
    return total


def copy_bandwidth_bytes_per_s(device: torch.device) -> float:
    """A 1 GiB device-to-device copy: bytes read plus written over its median CUDA-event time."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(event_times_ms(lambda: dst.copy_(src), 20))
    return 2 * COPY_BYTES / (ms * 1e-3)
