"""Training the harness's byte-level LMs on the stdlib corpus, within a time budget.

Models train on the torch ops (``use_kernels=False``): SDPA attention and, for the MoE, the
experts on ``torch._grouped_mm`` (``models.grouped_mm_experts``), so the backward is two grouped
GEMMs per projection, never a per-expert Python loop. AdamW, a warmup-then-cosine schedule, bf16
autocast on a GPU, and for the MoE a switch-style load-balancing loss (without one, the routers
starve experts). The step count is ``max_steps`` or what ``time_budget_s`` allows, whichever is
fewer: after a few timed steps the schedule is set for the steps that fit the budget.
"""
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.harness.models import TransformerLM
from costmodel.ops import ModelDims

LOG_EVERY = 50
TIMING_STEPS = 5  # steps timed (after the first, which compiles and allocates) to size the schedule


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int
    lr: float
    time_budget_s: float | None = None
    aux_loss_coef: float = 0.01
    seed: int = 0


def balance_loss_hooks(lm: TransformerLM, losses: list) -> list:
    """Forward hooks on every router that append a switch-style load-balancing loss to ``losses``:
    E * sum_e (share of routed slots on e) * (mean router probability of e); 1 when balanced."""
    def hook(router: torch.nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        logits, _, ids = output
        E = logits.shape[-1]
        ones = torch.ones(ids.numel(), device=ids.device)
        share = torch.zeros(E, device=ids.device).index_add_(0, ids.reshape(-1).long(), ones) / ids.numel()
        losses.append(E * (share * logits.float().softmax(-1).mean(0)).sum())
    return [block.moe.gate.register_forward_hook(hook) for block in lm.blocks]


def learning_rate(step: int, steps: int, peak_lr: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def random_batch(stream: torch.Tensor, batch_size: int, seq_length: int, generator: torch.Generator,
                 device: torch.device) -> tuple:
    starts = torch.randint(0, len(stream) - seq_length - 1, (batch_size,), generator=generator)
    rows = torch.stack([stream[s:s + seq_length + 1] for s in starts.tolist()]).to(device, torch.long)
    return rows[:, :-1], rows[:, 1:]


def budgeted_steps(config: TrainConfig, step_s: float) -> int:
    """The steps that fit the time budget at ``step_s`` per step (at most ``max_steps``)."""
    if config.time_budget_s is None:
        return config.max_steps
    return max(TIMING_STEPS + 2, min(config.max_steps, int(config.time_budget_s / max(step_s, 1e-6))))


def train_model(dims: ModelDims, num_layers: int, moe: bool, config: TrainConfig, train_stream: torch.Tensor,
                device: torch.device, name: str) -> tuple:
    """Train one model; (model, meta)."""
    model = TransformerLM(dims, num_layers, moe=moe, use_kernels=False, device=device, seed=config.seed)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.01,
                                  fused=fused)
    generator = torch.Generator().manual_seed(config.seed)
    balance = []
    hooks = balance_loss_hooks(model, balance) if moe else []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, loss_value, steps, step = time.monotonic(), None, config.max_steps, 0
    while step < steps:
        if step == 1:
            t_timing = _now(device)
        if step == 1 + TIMING_STEPS:
            steps = budgeted_steps(config, (_now(device) - t_timing) / TIMING_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, config.lr)
        inputs, targets = random_batch(train_stream, config.batch_size, dims.seq_len, generator, device)
        balance.clear()
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total = loss + config.aux_loss_coef * torch.stack(balance).mean() if balance else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0 or step == steps - 1:
            loss_value = loss.item()
            print(f"{name} step {step + 1}/{steps}: loss {loss_value:.3f} nats/byte, {time.monotonic() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        step += 1
    for hook in hooks:
        hook.remove()
    meta = {"dims": asdict(dims), "num_layers": num_layers, "moe": moe, "seed": config.seed, "steps": steps,
            "batch_size": config.batch_size, "seq_length": dims.seq_len, "lr": config.lr,
            "time_budget_s": config.time_budget_s, "aux_loss_coef": config.aux_loss_coef if moe else None,
            "train_seconds": time.monotonic() - t0, "tokens_trained": steps * config.batch_size * dims.seq_len,
            "experts_backend": "torch._grouped_mm" if moe else None, "attention_backend": "torch SDPA",
            "final_train_loss_nats_per_byte": loss_value, "parameters": model.parameter_counts()}
    return model, meta


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic()
