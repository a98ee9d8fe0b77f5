"""MoE routing: router logits -> fp32 softmax -> (+ selection bias) -> top-k -> (renormalise)
(the expert-grouped layout the fused experts read from the ids is ``kernels.expert_blocks``).

The selection bias [E] only changes *which* experts are chosen: the gate weights always come
from the unbiased probabilities (as DeepSeek-V3 does it), so a zero bias is exactly plain
top-k. Ties go to the lowest expert index. Everything here stays on the device: no ``.item()``,
no data-dependent Python branching, so the whole path can be captured in a CUDA graph.

NaN policy (documented, tested): a NaN or +Inf (overflowed) logit is treated as -inf, so that expert is never chosen
through it and gets weight 0; a token whose logits are all NaN gets weight 0 on every chosen
expert, so it contributes nothing to the layer output. ``RoutingResult.nan_tokens`` counts such
tokens on the device; ``route(..., nan_policy="raise")`` instead checks on the host (one sync)
and raises ``ValueError``.

Masked experts: an expert is *unselectable* when its probability is 0 (NaN or -inf logit) or its
selection score (probability + bias) is NaN or at most float32's lowest, -3.4e38 (a bias of -inf
is how a caller masks an expert out, e.g. a failed GPU's). An unselectable expert is never chosen
over a selectable one, whatever the bias. When a token has fewer than K selectable experts, its
spare slots still get *distinct* ids, the lowest-index unchosen experts, with weight 0 (before
renormalisation, so the selectable experts' weights renormalise among themselves). The K ids of
a token are always distinct and in [0, E).
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import config as _config
from kernels._library import kernel_op
from kernels.tiles import cdiv, next_power_of_2
from kernels.validate import INDEX_DTYPES, check_bool, check_int, check_tensor

# the selection score of every unselectable expert: float32's lowest, below any selectable score,
# and finite, so spare slots still pick K distinct experts (the lowest indices)
UNSELECTABLE = tl.constexpr(-3.4028234663852886e38)


@dataclass(frozen=True)
class RoutingResult:
    topk_weights: torch.Tensor  # [T, K] float32, from the unbiased probabilities
    topk_ids: torch.Tensor  # [T, K] int32
    nan_tokens: torch.Tensor  # [1] int32: tokens whose logits held a NaN


@triton.jit
def _probabilities(p_logits, o_t, o_e, m_t, m_e, STRIDE_LT: tl.constexpr):
    """(probabilities [BT, BE] fp32, NaN-token flags [BT]) of a block of tokens: NaN and +Inf
    logits count as -inf; an all-NaN row's probabilities are 0, not NaN. The row stride is a
    constexpr: a runtime stride that is no multiple of 16 (60 or 120 experts) leaves the compiler
    no alignment to vectorize by, which took the kernel from 3.6 to 6.0-14.6 µs on an H100."""
    b_logits = tl.load(p_logits + o_t[:, None] * STRIDE_LT + o_e[None, :], mask=m_t[:, None] & m_e[None, :],
                       other=float("-inf")).to(tl.float32)  # [BT, BE]
    m_nan = (b_logits != b_logits) | (b_logits == float("inf"))  # +Inf (overflow) counts as NaN
    b_logits = tl.where(m_nan, float("-inf"), b_logits)
    b_max = tl.max(b_logits, 1)
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_exp = tl.exp(b_logits - b_max[:, None])
    b_sum = tl.sum(b_exp, 1)
    b_probs = b_exp / tl.where(b_sum > 0, b_sum, 1.0)[:, None]
    return b_probs, tl.max(m_nan.to(tl.int32), 1) > 0


@triton.jit
def _selection(b_probs, b_bias, m_e):
    """(selection scores, gate weights) [BT, BE] under the masked-expert rule: unselectable experts
    (probability 0, score NaN or <= float32's lowest) share one finite score below every selectable
    one and weigh 0; padding experts score -inf, so they are never chosen."""
    b_select = b_probs + b_bias
    m_selectable = (b_probs > 0) & (b_select > UNSELECTABLE)  # NaN compares False
    b_gate = tl.where(m_selectable, b_probs, 0.0)
    b_select = tl.where(m_selectable, b_select, UNSELECTABLE)
    return tl.where(m_e[None, :], b_select, float("-inf")), b_gate


@triton.jit
def _pick(b_select, b_gate, o_e):
    """The best expert of every token [BT] (lowest index on ties), its gate weight, its score, and
    the scores with it removed."""
    b_best = tl.argmax(b_select, 1, tie_break_left=True)
    m_best = o_e[None, :] == b_best[:, None]
    b_score = tl.max(b_select, 1)
    b_weight = tl.sum(tl.where(m_best, b_gate, 0.0), 1)
    return b_best, b_weight, b_score, tl.where(m_best, float("-inf"), b_select)


@triton.jit
def _top_k(b_select, b_gate, o_e, o_k, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """(ids, gate weights) [BT, BK] of the TOP_K best experts of every token, best first."""
    b_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    b_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        b_best, b_weight, _, b_select = _pick(b_select, b_gate, o_e)
        b_ids = tl.where(o_k[None, :] == k, b_best[:, None], b_ids)
        b_weights = tl.where(o_k[None, :] == k, b_weight[:, None], b_weights)
    return b_ids, b_weights


@triton.jit
def _bias_vector(p_bias, stride_bias, o_e, E, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The caller's [E] selection bias (zeros without one), padding lanes 0."""
    b_bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_e * stride_bias, mask=o_e < E, other=0.0)
    return b_bias


@triton.jit
def _renormalized(b_weights, RENORMALIZE: tl.constexpr):
    if RENORMALIZE:
        b_total = tl.sum(b_weights, 1)
        b_weights = b_weights / tl.where(b_total > 0, b_total, 1.0)[:, None]
    return b_weights


@triton.jit
def _topk_routing_kernel(
    p_logits, p_bias, p_weights, p_ids, p_nan_tokens,
    T, E, stride_bias,
    STRIDE_LT: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)
    m_t, m_e = o_t < T, o_e < E

    b_probs, m_nan = _probabilities(p_logits, o_t, o_e, m_t, m_e, STRIDE_LT)  # [BT, BE], [BT]
    tl.atomic_add(p_nan_tokens, tl.sum(m_nan.to(tl.int32), 0))
    b_bias = _bias_vector(p_bias, stride_bias, o_e, E, BLOCK_E, HAS_BIAS)
    b_select, b_gate = _selection(b_probs, b_bias[None, :], m_e)
    b_ids, b_weights = _top_k(b_select, b_gate, o_e, o_k, TOP_K, BLOCK_T, BLOCK_K)
    b_weights = _renormalized(b_weights, RENORMALIZE)

    m_out = m_t[:, None] & (o_k[None, :] < TOP_K)
    tl.store(p_ids + o_t[:, None] * TOP_K + o_k[None, :], b_ids, mask=m_out)
    tl.store(p_weights + o_t[:, None] * TOP_K + o_k[None, :], b_weights, mask=m_out)


def row_block(T: int, E: int, most: int) -> int:
    """Tokens per program of the routing kernels: at most ``most`` (the launch config's), 4096 //
    BLOCK_E (the [BT, BE] tiles stay in registers) and T's next power of two (no idle rows)."""
    return max(1, min(most, 4096 // next_power_of_2(E), next_power_of_2(T)))


def launch_config(op: str, T: int, E: int, device: torch.device | str, override: dict | None = None) -> tuple[int, int]:
    """(tokens per program, num_warps) for a routing kernel ``op`` ("topk_routing" or
    "policy_routing") at T tokens and E experts: ``kernels/configs/<op>/<GPU>.json`` (``python -m
    bench.tune_routing`` writes it), or ``override`` (a {"block_t", "num_warps"} dict: the tuner's candidate)."""
    config = _config.lookup(op, device, t=T, e=E) if override is None else _checked_launch_config(override)
    return row_block(T, E, config["block_t"]), config["num_warps"]


def _checked_launch_config(config):
    if not isinstance(config, dict) or set(config) != {"block_t", "num_warps"}:
        raise ValueError(f"config must be a dict with keys block_t and num_warps, got {config!r}")
    check_int("config['block_t']", config["block_t"], 1)
    if config["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"config['num_warps'] must be 1, 2, 4, 8 or 16, got {config['num_warps']!r}")
    return config


def topk_routing(router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None,
                 renormalize: bool = True, *, config: dict | None = None) -> RoutingResult:
    """Launch the routing kernel on validated inputs; see ``route``. ``config`` overrides the
    launch config (``launch_config``)."""
    T, E = router_logits.shape
    device = router_logits.device
    weights = torch.empty((T, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=device)
    nan_tokens = torch.zeros(1, dtype=torch.int32, device=device)
    if T > 0:
        block_t, num_warps = launch_config("topk_routing", T, E, device, config)
        _topk_routing_kernel[(cdiv(T, block_t),)](
            router_logits, selection_bias, weights, ids, nan_tokens, T, E,
            selection_bias.stride(0) if selection_bias is not None else 0, STRIDE_LT=router_logits.stride(0),
            TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=next_power_of_2(E), BLOCK_K=next_power_of_2(top_k),
            HAS_BIAS=selection_bias is not None, RENORMALIZE=renormalize, num_warps=num_warps,
        )
    return RoutingResult(weights, ids, nan_tokens)


def _route_fake(router_logits, top_k, selection_bias, renormalize):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.float32),
            router_logits.new_empty((T, top_k), dtype=torch.int32), router_logits.new_empty((1,), dtype=torch.int32))


def launch_route(router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None,
                 renormalize: bool) -> tuple:
    routing = topk_routing(router_logits, top_k, selection_bias, renormalize)
    return routing.topk_weights, routing.topk_ids, routing.nan_tokens


_route_op = kernel_op(
    "route", "(Tensor router_logits, int top_k, Tensor? selection_bias, bool renormalize) -> (Tensor, Tensor, Tensor)",
    launch_route, fake=_route_fake)


def route_checked(router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None,
                  renormalize: bool = True) -> RoutingResult:
    """``topk_routing`` on validated inputs as the ``energy_moe::route`` custom op, which
    ``torch.compile`` traces around (``TopKRouter`` and ``route`` call it)."""
    return RoutingResult(*_route_op(router_logits, top_k, selection_bias, renormalize))


def route_reference(router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None,
                    renormalize: bool = True) -> tuple:
    """The routing in torch: (weights [T, K] float32, ids [T, K] int64), with the module's NaN and
    masked-expert rules; ties go to the lowest index (a stable sort), as in the kernel."""
    logits = router_logits.float().nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    select = probs if selection_bias is None else probs + selection_bias.float()
    selectable = (probs > 0) & (select > UNSELECTABLE.value)  # NaN compares False
    select = torch.where(selectable, select, UNSELECTABLE.value)
    ids = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = torch.where(selectable, probs, 0.0).gather(1, ids)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return weights, ids


def route(router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None, renormalize: bool = True,
          nan_policy: str = "mask") -> RoutingResult:
    """Top-k routing of router logits.

    Args:
        router_logits: [T, E] float tensor.
        top_k: experts per token, 1 <= top_k <= E.
        selection_bias: optional [E] float32 tensor added to the probabilities for selection only.
        renormalize: divide the chosen weights by their sum.
        nan_policy: ``"mask"`` (no host sync; see the module docstring) or ``"raise"`` (syncs once and
            raises ``ValueError`` on a NaN or +Inf logit).
    Returns:
        ``RoutingResult`` with ``topk_weights`` [T, K] float32 and ``topk_ids`` [T, K] int32.
    """
    check_tensor("router_logits", router_logits, ndim=2)
    T, E = router_logits.shape
    if E == 0:
        raise ValueError(f"router_logits must score at least one expert, got shape {tuple(router_logits.shape)}")
    top_k = check_int("top_k", top_k, 1, E)
    if router_logits.stride(1) != 1 and E > 1:
        raise ValueError(f"router_logits must be contiguous in its last dim, got strides {router_logits.stride()}")
    check_selection_bias(selection_bias, E, router_logits.device)
    renormalize = check_bool("renormalize", renormalize)
    if nan_policy not in ("mask", "raise"):
        raise ValueError(f"nan_policy must be 'mask' or 'raise', got {nan_policy!r}")
    if nan_policy == "raise" and (router_logits.isnan() | router_logits.isposinf()).any():
        raise ValueError("router_logits contains NaN or +Inf (nan_policy='raise')")
    return route_checked(router_logits, top_k, selection_bias, renormalize)


def check_selection_bias(selection_bias: torch.Tensor | None, num_experts: int, device: torch.device) -> None:
    """None, or a float32 [E] tensor on ``device`` (any stride: the kernel reads it with its own)."""
    if selection_bias is None:
        return
    check_tensor("selection_bias", selection_bias, ndim=1, dtypes=(torch.float32,))
    if selection_bias.shape[0] != num_experts or selection_bias.device != device:
        raise ValueError(f"selection_bias must be a [{num_experts}] tensor on {device}, got "
                         f"{tuple(selection_bias.shape)} on {selection_bias.device}")


def check_topk_ids(name: str, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Validate integer top-k ids [T, K] against E experts (host check: one device sync)."""
    check_tensor(name, topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"{name} selects {topk_ids.shape[1]} experts per token but there are only {num_experts}")
    if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= num_experts):
        raise ValueError(f"{name} has values outside [0, {num_experts})")
