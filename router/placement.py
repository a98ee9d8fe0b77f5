"""The placement cost of the energy-aware router: what a remote expert adds per routed token.

Under expert parallelism (``expert_placement=(rank, world_size)``, experts
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
"""
from typing import TYPE_CHECKING

import torch

from costmodel.ops import BYTES_PER_ELEMENT
from kernels.validate import check_int

if TYPE_CHECKING:
    from costmodel.kernel_cost_model import KernelCostModel

COMM_OP = "all_to_all"
DEFAULT_MESSAGE_TOKENS = 8192  # tokens per rank in one all_to_all: the default message size's rows


def check_placement(placement: "tuple | None", num_experts: int) -> "tuple | None":
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


def placement_extra_cost(model: "KernelCostModel", placement: "tuple | None", num_experts: int, d_model: int,
                         bytes_per_rank: "int | None") -> "torch.Tensor | None":
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
