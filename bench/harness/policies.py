"""Routing policies on one trained harness MoE, measured as deployed (``python -m bench.router_policies``).

Every policy routes the same trained ``TransformerLM`` (its gate weights shared, never changed):

- ``topk``: plain top-k (``kernels.TopKRouter``);
- ``oea_k<k0>``: ``router.OEARouter`` (the published peer: keep k0, piggyback on the active set);
- ``ours_k<k0>`` / ``ours_p<share>``: ``router.EnergyAwareTTTRouter``'s baseline-preserving
  policy on the measured cost table, frozen (no test-time training);
- ``ours_..._ttt``: the same with test-time training on (bias offsets and gate weight, on a copy
  of the gate weight), to measure whether it pays.

Per policy and decode batch B, ``DecodeStream`` decodes B held-out byte streams teacher-forced,
one byte per step after a prefill of ``context`` bytes, through the deployed step (captured in a
CUDA graph on a GPU, the KV cache static). The same stream gives the held-out bits/byte *at that
batch* (a batch-aware policy's quality depends on which tokens share a step) and the router
statistics (distinct experts per layer call, slots moved off plain top-k, active slots per
token). Then the step runs back to back over the stream's last round for the latency (CUDA events)
and the whole step's energy (NVML counter windows >= 1 s), and the MoE layers alone replay on
hidden states recorded from plain top-k's decode of that round for the MoE-layer energy (all
layers' routers and experts; identical inputs for every policy). The forward (batch_size x
seq_length, one graph) gives its own J/token, and ``evaluate`` the full-context bits/byte.
"""
import argparse
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.harness import graphs
from bench.harness.corpus import evaluate
from bench.harness.measure import DeviceEnv, text_rows, time_calls_ms
from bench.harness.models import TransformerLM
from calibration.energy import EagerRunner, measure_energy
from costmodel.kernel_cost_model import KernelCostModel
from kernels.moe_layer import TopKRouter
from router.energy_router import EnergyAwareTTTRouter
from router.monitor import HardwareMonitor
from router.oea import OEARouter

OBJECTIVE_WEIGHTS = {"energy": 1.0, "latency": 0.0, "quality": 1.0}  # the router's defaults: max_shift 1
TIMING_RUNS = 7
RECORDED_STEPS = 32  # decode steps whose MoE inputs the MoE-layer measurement replays
STAT_KEYS = ("distinct_experts_per_call", "plain_distinct_experts_per_call", "changed_slot_fraction",
             "rerouted_fraction", "active_experts_per_token")


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "topk", "oea" or "ours"
    keep_top_k: int = None
    keep_share: float = None
    adapt: bool = False

    def describe(self) -> dict:
        keep = f"keep_top_k={self.keep_top_k}" if self.keep_top_k is not None else f"keep_share={self.keep_share}"
        return {"topk": "plain top-k (kernels.TopKRouter)",
                "oea": f"router.OEARouter, {keep} (Opportunistic Expert Activation)",
                "ours": f"EnergyAwareTTTRouter, {keep}, max_shift 1, "
                        + ("test-time training on (offsets + gate)" if self.adapt else "frozen")}[self.kind]


def parse_keep(text: str) -> tuple:
    """'k2' -> (2, None); 'p0.6' -> (None, 0.6)."""
    if len(text) > 1 and text[0] == "k" and text[1:].isdigit():
        return int(text[1:]), None
    if len(text) > 1 and text[0] == "p":
        try:
            share = float(text[1:])
        except ValueError:
            share = math.nan
        if 0.0 < share <= 1.0:
            return None, share
    raise ValueError(f"a keep setting is k<experts> or p<share in (0, 1]>, e.g. k2 or p0.6, got {text!r}")


def default_keeps(top_k: int) -> tuple:
    """(OEA's k0 settings, ours): a quarter, half and three quarters of K for OEA; K/4, K/2 and two
    weight shares for ours (duplicates and K itself, which is plain top-k, dropped)."""
    quarters = sorted({max(1, top_k * q // 4) for q in (1, 2, 3)} - {top_k}) or [max(1, top_k - 1)]
    ours = [f"k{k}" for k in quarters[:2]] + ["p0.5", "p0.7"]
    return [f"k{k}" for k in quarters], ours


def policy_grid(oea_keeps: list, our_keeps: list, ttt_keeps: list) -> list:
    policies = [Policy("topk", "topk")]
    for text in oea_keeps:
        k0, share = parse_keep(text)
        if share is not None:
            raise ValueError(f"OEA keeps a number of experts (k<n>), got {text!r}")
        policies.append(Policy(f"oea_{text}", "oea", keep_top_k=k0))
    for text, adapt in [(t, False) for t in our_keeps] + [(t, True) for t in ttt_keeps]:
        k0, share = parse_keep(text)
        policies.append(Policy(f"ours_{text}" + ("_ttt" if adapt else ""), "ours", k0, share, adapt))
    return policies


class PolicyModel:
    """The trained MoE LM with its plain gates kept, re-routed by one policy at a time."""

    def __init__(self, lm, cost_model, ttt):
        self.lm, self.cost_model, self.ttt = lm, cost_model, ttt
        self.plain_gates = [block.moe.gate for block in lm.blocks]

    def install(self, policy: Policy, monitor: HardwareMonitor | None, track_stats: bool) -> TransformerLM:
        for block, plain in zip(self.lm.blocks, self.plain_gates):
            block.moe.gate = policy_router(policy, plain, self.cost_model, monitor, track_stats, self.ttt)
        return self.lm

    def routers(self) -> list:
        return [block.moe.gate for block in self.lm.blocks]

    def restore(self) -> None:
        for block, plain in zip(self.lm.blocks, self.plain_gates):
            block.moe.gate = plain


def policy_router(policy: Policy, plain: TopKRouter, cost_model: KernelCostModel, monitor: HardwareMonitor | None,
                  track_stats: bool, ttt: dict | None = None) -> TopKRouter:
    """The router ``policy`` puts in place of a plain ``TopKRouter`` (sharing its gate weight, or a
    copy when test-time training steps it; ``ttt`` holds the update's settings)."""
    if policy.kind == "topk":  # OEA keeping all K experts is plain top-k, with statistics
        return OEARouter.from_router(plain, plain.top_k) if track_stats else plain
    if policy.kind == "oea":
        return OEARouter.from_router(plain, policy.keep_top_k, track_stats)
    if policy.adapt and ttt is None:
        raise ValueError(f"{policy.name}: test-time training needs its settings (ttt)")
    weight = plain.weight.detach().clone() if policy.adapt else plain.weight
    num_experts, d_model = weight.shape
    ttt_settings = {} if ttt is None else {"ttt_update_frequency": ttt["update_frequency"],
                                           "ttt_chunk_size": ttt["chunk_size"], "energy_aware_lr": ttt["lr"]}
    return EnergyAwareTTTRouter(
        d_model, num_experts, plain.top_k, cost_model, OBJECTIVE_WEIGHTS, monitor=monitor, weight=weight,
        renormalize=plain.renormalize, weights_dtype=plain.weights_dtype, keep_top_k=policy.keep_top_k,
        keep_share=policy.keep_share, adapt=policy.adapt, ttt_gate=policy.adapt, track_stats=track_stats,
        **ttt_settings)


def router_stats(routers: list) -> dict | None:
    """The routers' statistics, averaged over the layers (None for plain top-k's TopKRouter)."""
    if not all(hasattr(r, "stats") for r in routers):
        return None
    stats = [r.stats() for r in routers]
    out = {key: statistics.mean(s[key] for s in stats) for key in STAT_KEYS}
    out["calls_per_layer"] = stats[0]["calls"]
    if "ttt_updates" in stats[0]:
        out |= {"ttt_updates": sum(s["ttt_updates"] for s in stats), "ttt_time_s": sum(s["ttt_time_s"] for s in stats)}
    return out


def reset_router_stats(routers: list) -> None:
    for r in routers:
        if hasattr(r, "reset_stats"):
            r.reset_stats()


def set_tracking(routers: list, on: bool) -> None:
    """Statistics on or off for eager calls (a captured step keeps what it captured)."""
    for r in routers:
        if hasattr(r, "track_stats"):
            r.track_stats = on


class DecodeStream:
    """B held-out byte streams decoded teacher-forced: ``rows`` [rounds, B, context + steps + 1];
    each round prefills ``context`` bytes, then every step feeds one byte per stream and predicts
    the next. ``graph``: the step is captured once (a CUDA graph over the static cache, with the
    routers' test-time updates replayed between steps); else eager calls."""

    def __init__(self, lm, rows, context, graph):
        self.lm, self.rows, self.context = lm, rows, context
        self.steps = rows.shape[2] - context - 1
        self.cache = lm.new_cache(rows.shape[1], capacity=context + self.steps + graphs.WARMUP_CALLS + 1)
        self.inputs = rows[0, :, context:context + 1].clone()
        self.position = 0
        self.prefill(0)
        body = self._body
        self.call = graphs.GraphStep(body, graphs.adapting_modules(lm), self.inputs.numel()) if graph else body
        self.cache.rewind(context)

    def _body(self):
        return self.lm(self.inputs, self.cache)

    def prefill(self, round_index: int) -> None:
        """Fill the cache with round ``round_index``'s first ``context`` bytes (eager, statistics off)."""
        routers = [b.moe.gate for b in self.lm.blocks]
        set_tracking(routers, False)
        self.cache.clear()
        with torch.no_grad():
            self.lm(self.rows[round_index, :, :self.context], self.cache)
        set_tracking(routers, True)
        self.position = 0

    def step(self, round_index: int = -1) -> torch.Tensor:
        """One decode step at the next position of round ``round_index`` (rewound at its end)."""
        if self.position == self.steps:
            self.cache.rewind(self.context)
            self.position = 0
        at = self.context + self.position
        self.inputs.copy_(self.rows[round_index, :, at:at + 1])
        self.position += 1
        return self.call()

    def bits_per_byte(self) -> tuple:
        """Held-out bits/byte of every decode step's prediction, over all rounds (one sync at the end)."""
        nats = torch.zeros((), dtype=torch.float64, device=self.rows.device)
        with torch.no_grad():
            for r in range(self.rows.shape[0]):
                if r:
                    self.prefill(r)
                for j in range(self.steps):
                    logits = self.step(r)
                    target = self.rows[r, :, self.context + j + 1]
                    nats += F.cross_entropy(logits[:, 0].float(), target, reduction="sum")
        predicted = self.rows.shape[0] * self.rows.shape[1] * self.steps
        return nats.item() / predicted / math.log(2), predicted


def stream_rows(text: torch.Tensor, batch_size: int, context: int, steps: int, budget_bytes: int,
                device: torch.device) -> torch.Tensor:
    """[rounds, B, context + steps + 1] windows of held-out text: enough rounds for ``budget_bytes``
    predictions (at least one), consecutive windows of the text."""
    rounds = max(1, math.ceil(budget_bytes / (batch_size * steps)))
    rows = text_rows(text, rounds * batch_size, context + steps + 1, device)
    return rows.view(rounds, batch_size, context + steps + 1)


def record_moe_inputs(lm: TransformerLM, stream: DecodeStream, steps: int) -> torch.Tensor:
    """[layers, steps, B, H]: each MoE layer's input over ``steps`` eager decode steps of the stream's
    last round (plain top-k's hidden states: every policy's MoE layers then replay the same inputs)."""
    stream.prefill(stream.rows.shape[0] - 1)
    recorded = [[] for _ in lm.blocks]
    hooks = [block.moe.gate.register_forward_pre_hook(
        lambda _m, args, i=i: recorded[i].append(args[0].detach().clone())) for i, block in enumerate(lm.blocks)]
    try:
        with torch.no_grad():
            for j in range(min(steps, stream.steps)):
                at = stream.context + j
                stream.inputs.copy_(stream.rows[-1, :, at:at + 1])
                lm(stream.inputs, stream.cache)  # eager: the hooks see the inputs
    finally:
        for hook in hooks:
            hook.remove()
    stream.cache.rewind(stream.context)
    stream.position = 0
    return torch.stack([torch.stack(r) for r in recorded])  # the router's input: [B, H] per step


class MoELayersStep:
    """Every MoE layer once on recorded inputs ([layers, steps, B, H]), the next step's per call."""

    def __init__(self, lm, recorded, graph):
        self.lm, self.recorded = lm, recorded
        self.inputs = recorded[:, 0].clone()  # [layers, B, H]
        self.index = 0
        self.call = graphs.CapturedCall(self._body) if graph else self._body

    def _body(self):
        return [self.lm.ops.moe(block.moe, self.inputs[i]) for i, block in enumerate(self.lm.blocks)]

    def __call__(self):
        self.inputs.copy_(self.recorded[:, self.index % self.recorded.shape[1]])
        self.index += 1
        return self.call()


def timed_energy(env: DeviceEnv, fn: Callable[[], object], tokens_per_call: int, trials: int, on_gpu: bool) -> dict:
    """Latency (ms; back-to-back calls, CUDA events) and, on a metered GPU, NVML energy per token (J)."""
    with torch.no_grad():
        for _ in range(graphs.WARMUP_CALLS):
            fn()
        latencies = time_calls_ms(fn, TIMING_RUNS, on_gpu, back_to_back=True)
    entry = {"latency_ms_median": statistics.median(latencies), "latency_runs": len(latencies)}
    if not env.metered:
        return entry | {"energy_per_token_j": None, "energy_reason": env.energy_reason}
    energy = measure_energy(env.meter, EagerRunner(fn).run_for, env.idle_power_w, window_s=1.0, trials=trials)
    return entry | {"energy_per_token_j": energy["energy_j"] / tokens_per_call,
                    "energy_per_token_j_min": energy["energy_j_min"] / tokens_per_call,
                    "energy_per_token_j_max": energy["energy_j_max"] / tokens_per_call,
                    "power_w": energy["power_w"], "window_s": energy["window_s"],
                    "method": "NVML energy counter over >= 1 s windows of back-to-back calls, idle tail removed"}


def measure_decode(env: DeviceEnv, model: PolicyModel, policy: Policy, monitor: HardwareMonitor | None,
                   rows: torch.Tensor, context: int, recorded: torch.Tensor | None, args: argparse.Namespace) -> dict:
    """One policy at one decode batch: ``decode_quality`` then ``decode_timing``."""
    return decode_quality(model, policy, monitor, rows, context, env.on_gpu) | \
        decode_timing(env, model, policy, monitor, rows, context, recorded, args.energy_trials)


def decode_quality(model: PolicyModel, policy: Policy, monitor: HardwareMonitor | None, rows: torch.Tensor,
                   context: int, on_gpu: bool) -> dict:
    """Held-out bits/byte and the routers' statistics from the teacher-forced stream."""
    lm = model.install(policy, monitor, track_stats=True)
    stream = DecodeStream(lm, rows, context, graph=on_gpu)
    reset_router_stats(model.routers())
    bits, predicted = stream.bits_per_byte()
    return {"batch_size": rows.shape[1], "context": context, "bits_per_byte": bits, "predicted_bytes": predicted,
            "router": router_stats(model.routers())}


def decode_timing(env: DeviceEnv, model: PolicyModel, policy: Policy, monitor: HardwareMonitor | None,
                  rows: torch.Tensor, context: int, recorded: torch.Tensor | None, trials: int) -> dict:
    """Latency (ms) and energy (J per token) of the step and (``recorded`` given) of the MoE layers
    alone, statistics off as deployed."""
    on_gpu = env.on_gpu
    lm = model.install(policy, monitor, track_stats=False)
    stream = DecodeStream(lm, rows, context, graph=on_gpu)
    entry = {"step": timed_energy(env, stream.step, rows.shape[1], trials, on_gpu)}
    del stream
    if recorded is not None:
        entry["moe_layers"] = timed_energy(env, MoELayersStep(lm, recorded, on_gpu), rows.shape[1], trials, on_gpu)
    return entry


def merged_timings(passes: list) -> dict:
    """One ``timed_energy`` entry from passes of one window each: median latency (ms) over every run,
    energy (J per token) the mean of the windows (min and max across them)."""
    first = passes[0]
    merged = {"latency_ms_median": statistics.median(p["latency_ms_median"] for p in passes),
              "latency_runs": sum(p["latency_runs"] for p in passes), "passes": len(passes)}
    if first.get("energy_per_token_j") is None:
        return merged | {"energy_per_token_j": None, "energy_reason": first.get("energy_reason")}
    energies = [p["energy_per_token_j"] for p in passes]
    return merged | {"energy_per_token_j": statistics.mean(energies),
                     "energy_per_token_j_min": min(p["energy_per_token_j_min"] for p in passes),
                     "energy_per_token_j_max": max(p["energy_per_token_j_max"] for p in passes),
                     "power_w": statistics.mean(p["power_w"] for p in passes),
                     "window_s": [w for p in passes for w in p["window_s"]], "method": first["method"]}


def measure_forward(env: DeviceEnv, model: PolicyModel, policy: Policy, monitor: HardwareMonitor | None,
                    text: torch.Tensor, streams: list, args: argparse.Namespace) -> dict:
    """Full-context bits/byte (``evaluate``: eager windows of seq_length) and the forward's J/token."""
    lm = model.install(policy, monitor, track_stats=True)
    reset_router_stats(model.routers())
    quality = evaluate(lm, streams, args.seq_length, args.device)
    entry = {"bits_per_byte": quality["bits_per_byte"], "evaluated_bytes": quality["bytes"],
             "router": router_stats(model.routers())}
    lm = model.install(policy, monitor, track_stats=False)
    tokens = text_rows(text, args.batch_size, args.seq_length, args.device)
    mode = "graph" if env.on_gpu else "eager"
    entry |= {"batch_size": args.batch_size, "seq_length": args.seq_length, "mode": mode}
    entry["step"] = timed_energy(env, graphs.forward_step(lm, tokens, mode), tokens.numel(), args.energy_trials,
                                 env.on_gpu)
    return entry


def ttt_update_energy(env: DeviceEnv, model: PolicyModel, policy: Policy, monitor: HardwareMonitor | None,
                      rows: torch.Tensor, context: int) -> dict:
    """The test-time update alone: its graph (every layer's update) replayed back to back."""
    lm = model.install(policy, monitor, track_stats=False)
    DecodeStream(lm, rows, context, graph=env.on_gpu)  # its prefill fills the routers' windows and rings
    adapters = graphs.adapting_modules(lm)
    update = graphs.CapturedCall(lambda: [a.ttt_update() for a in adapters]) if env.on_gpu else \
        (lambda: [a.ttt_update() for a in adapters])
    entry = timed_energy(env, update, 1, 1, env.on_gpu)
    per_update = entry.pop("energy_per_token_j")
    return entry | {"energy_per_update_j": per_update, "layers": len(adapters),
                    "update_frequency_tokens": model.ttt["update_frequency"],
                    "amortised_j_per_token": None if per_update is None else
                    per_update / model.ttt["update_frequency"]}
