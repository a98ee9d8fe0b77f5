"""Routing policies on the Hugging Face drop-in path (``python -m bench.hf_router_policies``).

A transformers Qwen3-MoE model (HF architecture, random init) is patched with
``kernels.patch_hf_model``: every sparse-MoE block becomes a ``kernels.FusedMoE`` whose ``gate`` is
a ``kernels.TopKRouter`` sharing the HF gate weight. ``HFGates`` swaps those gates for one policy
at a time (plain top-k, ``router.OEARouter``, ``router.EnergyAwareTTTRouter`` frozen) and restores
them after.

Per decode batch B a random prompt of ``context`` tokens is prefilled eagerly (plain top-k) into a
transformers ``StaticCache`` of ``context + 1`` slots; ``DecodeStep`` then decodes slot ``context``
on every call, with the next batch of random ids from a fixed pool (the same for every policy).
On a GPU the step is one CUDA graph; on a CPU, eager calls. Per policy and B: latency, NVML energy
per token (``bench.harness.policies.timed_energy``), and the routers' statistics from an extra
eager pass with ``track_stats`` routers. Random weights: energy and routing only, no quality.
"""
import argparse
import inspect

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, StaticCache

import kernels
from bench.harness.graphs import CapturedCall
from bench.harness.measure import DeviceEnv
from bench.harness.policies import Policy, policy_router, router_stats, timed_energy
from bench.harness.policy_report import format_or_dash, ratio
from costmodel.kernel_cost_model import KernelCostModel
from kernels.moe_layer import FusedMoE
from router.monitor import HardwareMonitor

SHAPES = {
    # Qwen3-30B-A3B's layer shape; vocab 32000, not its 151936 (smaller embedding and LM head)
    "qwen3_30b_a3b": {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 4,
             "norm_topk_prob": True, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "intermediate_size": 128, "vocab_size": 256},
}
SHAPE_NOTES = {"qwen3_30b_a3b": "Qwen3-30B-A3B's attention and MoE layer shape with fewer layers, and vocab_size "
                                "32000 instead of 151936 to save memory (embedding and LM head only)",
               "tiny": "a tiny Qwen3-MoE for CPU runs under Triton's interpreter"}
ID_POOL_BATCHES = 16  # batches of random ids the decode step cycles through
NO_QUALITY = ("not measured: random weights (HF architecture, random init), so there is no quality to keep; "
              "energy, latency and routing statistics only")


def qwen3_config(shape: str, num_layers: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**SHAPES[shape], num_hidden_layers=num_layers, use_sliding_window=False,
                          attn_implementation="sdpa")


def build_model(config: Qwen3MoeConfig, device: torch.device | str, dtype: torch.dtype, seed: int) -> tuple:
    """(a randomly initialised Qwen3MoeForCausalLM on ``device`` in ``dtype``, eval, patched; blocks patched)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    model = model.to(dtype).eval()
    return model, kernels.patch_hf_model(model)


def hf_compat() -> dict:
    """What transformers sees beside our ``kernels`` package (the two share the import name)."""
    import transformers.integrations.hub_kernels  # noqa: F401 (it probes the name 'kernels')
    from transformers.utils import is_kernels_available
    return {"transformers_version": transformers.__version__, "import_transformers": "ok",
            "hub_kernels_integration_import": "ok", "our_kernels_module": kernels.__file__,
            "transformers_detects_hf_kernels": is_kernels_available(),
            "note": "ours is not taken for Hugging Face's kernels package (False above is the wanted answer)"}


# ---- the static cache and the decode step --------------------------------------------------------

def static_cache(config: Qwen3MoeConfig, batch_size: int, max_cache_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> StaticCache:
    """A transformers ``StaticCache``; its constructor changed across versions (4.x took the batch size,
    device and dtype; 5.x takes the config and length and sizes itself at the first update)."""
    offered = {"config": config, "max_cache_len": max_cache_len, "max_batch_size": batch_size,
               "batch_size": batch_size, "device": device, "dtype": dtype}
    accepted = inspect.signature(StaticCache.__init__).parameters
    return StaticCache(**{name: value for name, value in offered.items() if name in accepted})


def rewind(cache: StaticCache, length: int) -> None:
    """Set each cache layer's write position to ``length`` (transformers 5.x keeps it in a device
    counter: ``fill_`` is captured in the graph, no host sync). Caches written at the model's
    ``cache_position`` (older versions) have no counter: the static position does it."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def cache_kwargs(model: torch.nn.Module, cache: StaticCache, positions: torch.Tensor) -> dict:
    """The forward's cache and position arguments for tokens at ``positions`` [S], under the names this
    transformers version takes (``cache`` or ``past_key_values``; ``cache_position`` where accepted)."""
    accepted = inspect.signature(model.forward).parameters
    kwargs = {"cache" if "cache" in accepted else "past_key_values": cache, "position_ids": positions[None],
              "use_cache": True}
    if "cache_position" in accepted:
        kwargs["cache_position"] = positions
    return kwargs


def prefill(model: torch.nn.Module, cache: StaticCache, prompt: torch.Tensor) -> None:
    """The [B, C] prompt into the cache, eagerly."""
    positions = torch.arange(prompt.shape[1], device=prompt.device)
    with torch.no_grad():
        model(input_ids=prompt, **cache_kwargs(model, cache, positions))


class DecodeStep:
    """One decode step at position ``context`` of a prefilled static cache: each call copies the next
    [B, 1] ids of ``id_pool`` [N, B, 1] into the static input and decodes that slot again (the cache
    is rewound to ``context`` inside the step). ``graph``: the step is one CUDA graph, replayed;
    ``compile_options``: the step is ``torch.compile(step, **compile_options)`` instead."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache, context: int, id_pool: torch.Tensor, graph: bool,
                 compile_options: dict | None = None) -> None:
        self.model, self.cache, self.context, self.id_pool = model, cache, context, id_pool
        self.ids = id_pool[0].clone()
        batch_size, device = id_pool.shape[1], id_pool.device
        self.kwargs = cache_kwargs(model, cache, torch.tensor([context], device=device))
        # every slot 0..context is filled: a static 4-D mask, which transformers uses as given
        self.kwargs["attention_mask"] = torch.ones(batch_size, 1, 1, context + 1, dtype=torch.bool, device=device)
        self.calls = 0
        if compile_options is not None:
            self.call = torch.compile(self._body, **compile_options)
            return
        with torch.no_grad():  # the capture's warm-up calls too
            self.call = CapturedCall(self._body) if graph else self._body

    def _body(self) -> torch.Tensor:
        rewind(self.cache, self.context)
        return self.model(input_ids=self.ids, **self.kwargs).logits

    def __call__(self) -> torch.Tensor:
        self.ids.copy_(self.id_pool[self.calls % self.id_pool.shape[0]])
        self.calls += 1
        with torch.no_grad():
            return self.call()


# ---- policies on the patched model ---------------------------------------------------------------

class HFGates:
    """A patched model's ``FusedMoE`` layers with their plain gates kept; one policy's routers at a time."""

    def __init__(self, model: torch.nn.Module, cost_model: KernelCostModel | None) -> None:
        self.model, self.cost_model = model, cost_model
        self.layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        self.plain = [layer.gate for layer in self.layers]

    def install(self, policy: Policy, monitor: HardwareMonitor | None, track_stats: bool) -> list:
        """The policy's routers in every layer (returned); plain top-k with statistics is OEA keeping K."""
        for layer, plain in zip(self.layers, self.plain):
            layer.gate = policy_router(policy, plain, self.cost_model, monitor, track_stats)
        return [layer.gate for layer in self.layers]

    def restore(self) -> None:
        for layer, plain in zip(self.layers, self.plain):
            layer.gate = plain


def measure_policy(env: DeviceEnv, gates: HFGates, policy: Policy, monitor: HardwareMonitor | None, cache: StaticCache,
                   context: int, id_pool: torch.Tensor, args: argparse.Namespace) -> dict:
    """One policy at one decode batch: the step's latency and energy (statistics off, graph on a GPU),
    then ``args.stat_steps`` eager steps with statistics on; the plain gates restored after."""
    batch_size = id_pool.shape[1]
    try:
        gates.install(policy, monitor, track_stats=False)
        step = DecodeStep(gates.model, cache, context, id_pool, graph=env.on_gpu)
        entry = {"batch_size": batch_size, "step": timed_energy(env, step, batch_size, args.energy_trials,
                                                                env.on_gpu)}
        del step
        routers = gates.install(policy, monitor, track_stats=True)
        stats_step = DecodeStep(gates.model, cache, context, id_pool, graph=False)
        for _ in range(args.stat_steps):
            stats_step()
        entry["router"] = router_stats(routers)
    finally:
        gates.restore()
    return entry


def run_policies(env: DeviceEnv, gates: HFGates, policies: list, monitor: HardwareMonitor | None,
                 args: argparse.Namespace) -> dict:
    """{policy name: {description, keep, "decode": [one entry per batch]}}; one cache per batch, its
    prompt prefilled once with plain top-k, shared by every policy."""
    out = {p.name: {"description": p.describe(), "keep_top_k": p.keep_top_k, "keep_share": p.keep_share,
                    "decode": []} for p in policies}
    config, device = gates.model.config, env.device
    dtype = next(gates.model.parameters()).dtype
    generator = torch.Generator().manual_seed(args.seed)
    for batch_size in args.decode:
        cache = static_cache(config, batch_size, args.context + 1, device, dtype)
        prompt = torch.randint(config.vocab_size, (batch_size, args.context), generator=generator).to(device)
        prefill(gates.model, cache, prompt)
        id_pool = torch.randint(config.vocab_size, (ID_POOL_BATCHES, batch_size, 1), generator=generator).to(device)
        for policy in policies:
            print(f"[hf_router_policies] {policy.name}: decode B={batch_size}", flush=True)
            out[policy.name]["decode"].append(measure_policy(env, gates, policy, monitor, cache, args.context,
                                                             id_pool, args))
        del cache
        if env.on_gpu:
            torch.cuda.empty_cache()  # the batch's graph pools and cache
    return out


# ---- ratios and the table ------------------------------------------------------------------------

def summary_rows(results: dict) -> list:
    """Per policy and batch: J/token, latency and distinct experts, each also as a ratio to plain top-k's."""
    base = {d["batch_size"]: d for d in results["topk"]["decode"]}
    rows = []
    for name, entry in results.items():
        for decode in entry["decode"]:
            ref, stats, ref_stats = base[decode["batch_size"]], decode["router"], base[decode["batch_size"]]["router"]
            step, ref_step = decode["step"], ref["step"]
            rows.append({
                "policy": name, "batch_size": decode["batch_size"],
                "step_j_per_token": step["energy_per_token_j"],
                "step_energy_vs_topk": ratio(step["energy_per_token_j"], ref_step["energy_per_token_j"]),
                "step_latency_ms": step["latency_ms_median"],
                "latency_vs_topk": ratio(step["latency_ms_median"], ref_step["latency_ms_median"]),
                "distinct_experts_per_layer": stats["distinct_experts_per_call"],
                "distinct_experts_vs_topk": ratio(stats["distinct_experts_per_call"],
                                                   ref_stats["distinct_experts_per_call"]),
                "changed_slot_fraction": stats["changed_slot_fraction"],
                "active_slots_per_token": stats["active_experts_per_token"]})
    return rows


def table_lines(rows: list) -> list:
    fmt = format_or_dash
    lines = [f"{'policy':<12}{'B':>4}{'step ms':>9}{'x topk':>7}{'J/token':>11}{'x topk':>7}{'experts':>8}"
             f"{'x topk':>7}{'moved':>7}"]
    for r in rows:
        lines.append(f"{r['policy']:<12}{r['batch_size']:>4}{r['step_latency_ms']:>9.3f}"
                     f"{fmt(r['latency_vs_topk'], '>7.2f')}{fmt(r['step_j_per_token'], '>11.3e')}"
                     f"{fmt(r['step_energy_vs_topk'], '>7.2f')}{r['distinct_experts_per_layer']:>8.1f}"
                     f"{fmt(r['distinct_experts_vs_topk'], '>7.2f')}{r['changed_slot_fraction']:>7.1%}")
    return lines
