"""``OEARouter``: Opportunistic Expert Activation (Oncescu et al., arXiv 2511.02237), our peer.

Batch-aware re-routing for decode, implemented from the paper's description:

1. every token keeps its ``keep_top_k`` highest-weight experts (the quality baseline);
2. its other ``top_k - keep_top_k`` slots *piggyback*: they go, in descending router probability,
   to experts that some token of the batch already keeps, so the batch loads no expert beyond the
   union of the kept sets. A slot left without such an expert stays empty (id -1, weight 0;
   ``FusedMoE`` skips it), so at batch 1 a token runs its ``keep_top_k`` experts only.

The gate weights are the chosen experts' router probabilities, renormalised over them. OEA reads
no cost, temperature or memory state: it minimises the active-expert count and nothing else.
One launch of ``kernels.policy_routing`` (``fill="active"``) after the gate's linear layer, no
host sync, capturable in a CUDA graph; with ``track_stats`` one more small launch tallies the
same statistics ``EnergyAwareTTTRouter.stats()`` reports.
"""
import torch

from kernels.moe_layer import TopKRouter
from kernels.policy_routing import policy_routing
from kernels.routing_stats import STAT_FIELDS, routing_tallies, tally_summary
from kernels.validate import check_bool, check_int
from router.options import check_topk_router


class OEARouter(TopKRouter):
    """``TopKRouter``'s forward contract with OEA's two-step selection.

    Args:
        weight: the [E, H] gate weight (shared, not copied).
        top_k: slots per token (the model's K).
        keep_top_k: the experts each token always keeps, 1 <= keep_top_k <= top_k (the paper's k0).
        renormalize, weights_dtype: as ``TopKRouter``.
        track_stats: tally ``stats()`` (one small launch per call).
    """

    def __init__(self, weight, top_k, keep_top_k, renormalize=True, weights_dtype=None, track_stats=True):
        super().__init__(weight, top_k, renormalize, weights_dtype)
        self.keep_top_k = check_int("keep_top_k", keep_top_k, 1, self.top_k)
        self.track_stats = check_bool("track_stats", track_stats)
        self.register_buffer("_stats", torch.zeros(len(STAT_FIELDS), dtype=torch.int64, device=weight.device),
                             persistent=False)

    @classmethod
    def from_router(cls, router: TopKRouter, keep_top_k: int, track_stats: bool = True) -> "OEARouter":
        """Wrap a ``TopKRouter`` (e.g. a patched HF model's ``layer.gate``), sharing its gate weight."""
        check_topk_router(router)
        return cls(router.weight, router.top_k, keep_top_k, router.renormalize, router.weights_dtype, track_stats)

    def forward(self, hidden_states: torch.Tensor) -> tuple:
        router_logits = self._router_logits(hidden_states)
        routing = policy_routing(router_logits, self.top_k, fill="active", keep_top_k=self.keep_top_k,
                                 selection_bias=self.selection_bias, renormalize=self.renormalize)
        weights = routing.topk_weights
        if torch.is_grad_enabled() and router_logits.requires_grad:
            weights = self._differentiable_weights(router_logits, routing.topk_ids)
        if self.track_stats:
            routing_tallies(routing.plain_ids, routing.topk_ids, weights.detach(), routing.nan_tokens,
                            self.num_experts, stats=self._stats)
        if self.weights_dtype == "logits":
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, routing.topk_ids

    def stats(self) -> dict:
        """The accumulated statistics as Python numbers (one device sync)."""
        return tally_summary(self._stats, self.top_k) | {"keep_top_k": self.keep_top_k}

    def reset_stats(self) -> None:
        self._stats.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, keep_top_k={self.keep_top_k}"
