"""The harness's models as users deploy them: each step captured once in a CUDA graph and replayed.

``forward_step`` and ``decode_step`` return the zero-argument call the benchmark times, in
``"graph"`` mode (the default on a GPU) or ``"eager"`` mode (plain Python calls, for comparison).
A graph step captures the model's forward over static input tensors (a decode step also captures
rewinding the static ``KVCache`` to its context on the device, so every replay decodes the same
position at the same context length). Test-time training stays out of the captured forward: its
window and statistics are device work inside it, and the update itself is a second captured graph
(``ttt_update`` of each adapting module) that the host replays between forwards whenever the
module's token count (kept on the host, from shapes) says one is due. Nothing in a replayed step
syncs the host. Where the update cannot be captured, it runs as eager device work between
replays, and the step says so (``update_mode``).
"""
from collections.abc import Callable

import torch

from bench.harness.ttt_model import TTTLanguageModel
from router.energy_router import EnergyAwareTTTRouter

MODES = ("graph", "eager")
WARMUP_CALLS = 2


class CapturedCall:
    """``fn()`` captured once in a CUDA graph, after warm-up calls on a side stream; calling it replays
    the graph and returns the captured output (static tensors, overwritten by every replay)."""

    def __init__(self, fn, warmup_calls=WARMUP_CALLS):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_calls):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn()

    def __call__(self):
        self.graph.replay()
        return self.output


def adapting_modules(model: torch.nn.Module) -> list:
    """The modules whose test-time updates a graph step replays between forwards."""
    if isinstance(model, TTTLanguageModel):
        return [model] if model.adapt else []
    lm = model
    routers = [b.moe.gate for b in lm.blocks if lm.moe and isinstance(b.moe.gate, EnergyAwareTTTRouter)]
    return [r for r in routers if r.adapt and r.adaptive]


class GraphStep:
    """A captured forward (``body``) with the test-time updates of ``adapters`` replayed between calls."""

    def __init__(self, body, adapters, tokens_per_call):
        self.adapters, self.tokens_per_call = adapters, tokens_per_call
        self.forward = CapturedCall(body)
        self.update, self.update_mode = None, None
        if adapters:
            self.update, self.update_mode = _captured_or_eager(lambda: [a.ttt_update() for a in adapters])

    def __call__(self):
        if self.adapters and self.adapters[0].update_due():  # they see the same tokens: due together
            self.update()
            for a in self.adapters:
                a.note_update()
        out = self.forward()
        for a in self.adapters:
            a.note_tokens(self.tokens_per_call)
        return out


def _captured_or_eager(fn):
    try:
        return CapturedCall(fn), "captured CUDA graph between forward replays"
    except RuntimeError as exc:  # e.g. an optimiser that is not capturable
        torch.cuda.synchronize()
        return fn, f"eager device work between forward replays (capture failed: {str(exc).splitlines()[0]})"


def _body_model(model):
    """What a captured forward runs: the plain LM (a TTT model's updates are replayed apart)."""
    return model.lm if isinstance(model, TTTLanguageModel) else model


def _remembering(model, tokens):
    if isinstance(model, TTTLanguageModel) and model.adapt:
        model.remember(tokens)


def forward_step(model: torch.nn.Module, tokens: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """The call the benchmark times for one forward over ``tokens`` [B, S]."""
    _check_mode(mode)
    if mode == "eager":
        return lambda: model(tokens)
    lm = _body_model(model)

    def body() -> torch.Tensor:
        logits = lm(tokens)
        _remembering(model, tokens)
        return logits
    return GraphStep(body, adapting_modules(model), tokens.numel())


def decode_step(model: torch.nn.Module, prompt: torch.Tensor, next_tokens: torch.Tensor,
                mode: str) -> Callable[[], torch.Tensor]:
    """The call the benchmark times for one decode step: the cache holds ``prompt`` [B, C] and every
    call decodes ``next_tokens`` [B, 1] at position C (the cache is rewound to C first)."""
    _check_mode(mode)
    context = prompt.shape[1]
    cache = model.new_cache(prompt.shape[0])
    with torch.no_grad():
        model(prompt, cache)
    if mode == "eager":
        def step() -> torch.Tensor:
            cache.rewind(context)
            return model(next_tokens, cache)
        return step
    lm = _body_model(model)

    def body() -> torch.Tensor:
        cache.rewind(context)
        logits = lm(next_tokens, cache)
        _remembering(model, next_tokens)
        return logits
    return GraphStep(body, adapting_modules(model), next_tokens.numel())


def update_mode(step: Callable[[], torch.Tensor]) -> str | None:
    """How a step's test-time updates run (None: the model has none)."""
    if isinstance(step, GraphStep):
        return step.update_mode
    return None


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
