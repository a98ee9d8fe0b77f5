"""The ops the cost model knows, with their work (FLOPs) and fewest bytes moved at a batch size.

``batch_size`` counts tokens for the FFN, projection, norm, router and expert ops and sequences
(each ``seq_len`` long) for the attention ops. The projections, ``lm_head``, ``rms_norm`` and
``residual_add`` are the rest of the harness's transformer forward (``bench.harness.models``), so a whole
forward is a sum of table ops. Work and bytes feed the analytic priors and the compute- vs
memory-bound split of ``get_cost_breakdown``; the measured tables time the real kernels
(``kernels/``; ``rms_norm`` and ``residual_add`` are torch's) at the same shapes.

``COMM_OPS`` are the collectives, costed per message size (``bytes_per_rank``) and world size
from curves that ``calibration.collectives`` measures; they have no roofline work here.
"""
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # batch sizes may be tensors (costmodel.device); the cost model itself never imports torch
    import torch

BYTES_PER_ELEMENT = 2  # bf16

OPS = ("ffn_gate", "ffn_up", "ffn_down", "swiglu_gate_up", "swiglu_ffn", "attention_qk", "attention_av",
       "flash_attention", "moe_router", "fused_experts", "qkv_projection", "output_projection", "lm_head", "rms_norm",
       "residual_add", "fused_experts_fp8", "expert_ffn_fp8", "quantize_fp8")
# the FP8 ops (``kernels.fp8_experts``, ``kernels.quantize``) run only on GPUs with FP8 (compute capability >= 8.9)
FP8_OPS = ("fused_experts_fp8", "expert_ffn_fp8", "quantize_fp8")
FP8_BYTES = 1
SCALE_BYTES = 4  # float32 scales: one per output channel of the weights, one per row of the activations
SEQUENCE_OPS = ("attention_qk", "attention_av", "flash_attention")
# ops whose one-token cost does not carry to two or three tokens (``costmodel.curves``): the fused experts take
# one token on DecodeSlots, and Triton compiles a row count of 1 as a constant (for the decode GEMM config the
# main loop compiles to the same instructions as at 3 rows, yet the H100 tables' one-token GEMMs ran slower a byte)
ONE_TOKEN_OPS = tuple(op for op in OPS if op not in SEQUENCE_OPS + ("rms_norm", "residual_add"))
COMM_OPS = ("all_to_all",)  # torch.distributed.all_to_all_single with even splits: expert parallelism's exchange


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of the calibrated model; the defaults are the benchmark harness's."""
    d_model: int = 256
    d_ff: int = 1024
    n_heads: int = 4
    seq_len: int = 512
    num_experts: int = 4
    top_k: int = 2
    vocab_size: int = 256  # the harness's byte-level language models

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def expected_experts(batch_size: "float | torch.Tensor", num_experts: int, top_k: int) -> "float | torch.Tensor":
    """Distinct experts ``batch_size`` tokens touch when each picks ``top_k`` of ``num_experts``
    uniformly: E (1 - (1 - K/E)^B); K at one token, E for many. ``batch_size`` may be a tensor."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)


# the dims each op's kernels read: points measured at other dims that agree on these are the same op shape
OP_DIMS = {"ffn_gate": ("d_model", "d_ff"), "ffn_up": ("d_model", "d_ff"), "ffn_down": ("d_model", "d_ff"),
           "swiglu_gate_up": ("d_model", "d_ff"), "swiglu_ffn": ("d_model", "d_ff"),
           "attention_qk": ("d_model", "n_heads", "seq_len"), "attention_av": ("d_model", "n_heads", "seq_len"),
           "flash_attention": ("d_model", "n_heads", "seq_len"), "moe_router": ("d_model", "num_experts", "top_k"),
           "fused_experts": ("d_model", "d_ff", "num_experts", "top_k"), "qkv_projection": ("d_model",),
           "output_projection": ("d_model",), "lm_head": ("d_model", "vocab_size"), "rms_norm": ("d_model",),
           "residual_add": ("d_model",), "fused_experts_fp8": ("d_model", "d_ff", "num_experts", "top_k"),
           "expert_ffn_fp8": ("d_model", "d_ff"), "quantize_fp8": ("d_model",)}


def op_shape(op: str, dims: ModelDims) -> tuple:
    """The values of the dims ``op`` reads (``OP_DIMS``): two dims with the same op shape cost the same."""
    check_op(op)
    return tuple(getattr(dims, name) for name in OP_DIMS[op])


def check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the cost model knows {', '.join(OPS)}")


def work(op: str, batch_size: "float | torch.Tensor", dims: ModelDims) -> tuple:
    """(flops, bytes) of one call of ``op`` at ``batch_size``: bf16 operands (the FP8 ops' FP8 copies
    and scales besides), each read once."""
    check_op(op)
    B, H, I, S, D = batch_size, dims.d_model, dims.d_ff, dims.seq_len, dims.head_dim
    heads, E, K, b = dims.n_heads, dims.num_experts, dims.top_k, BYTES_PER_ELEMENT
    if op in ("ffn_gate", "ffn_up"):
        return 2.0 * B * H * I, b * (B * H + I * H + B * I)
    if op == "ffn_down":
        return 2.0 * B * I * H, b * (B * I + H * I + B * H)
    if op == "swiglu_gate_up":
        return 4.0 * B * H * I, b * (B * H + 2 * I * H + B * I)
    if op == "swiglu_ffn":
        return 6.0 * B * H * I, b * (2 * B * H + 3 * I * H + 2 * B * I)
    if op == "attention_qk":
        return 2.0 * B * heads * S * S * D, b * (2 * B * heads * S * D + B * heads * S * S)
    if op == "attention_av":
        return 2.0 * B * heads * S * S * D, b * (B * heads * S * S + 2 * B * heads * S * D)
    if op == "flash_attention":  # causal: half the score matrix
        return 2.0 * B * heads * S * S * D, b * 4 * B * heads * S * D
    if op == "moe_router":
        return 2.0 * B * H * E, b * (B * H + E * H) + 4 * B * (E + 2 * K)
    if op == "qkv_projection":
        return 6.0 * B * H * H, b * (B * H + 3 * H * H + 3 * B * H)
    if op == "output_projection":
        return 2.0 * B * H * H, b * (2 * B * H + H * H)
    if op == "lm_head":
        return 2.0 * B * H * dims.vocab_size, b * (B * H + dims.vocab_size * H + B * dims.vocab_size)
    if op == "rms_norm":
        return 4.0 * B * H, b * (2 * B * H + H)
    if op == "residual_add":
        return 1.0 * B * H, b * 3 * B * H
    if op == "quantize_fp8":  # one read of each row (the second pass hits L2), the FP8 copy and its scale
        return 3.0 * B * H, b * B * H + FP8_BYTES * B * H + SCALE_BYTES * B
    if op == "expert_ffn_fp8":  # fused_experts_fp8 with one expert, every token routed to it
        E, K = 1, 1
    touched = expected_experts(B, E, K)  # each touched expert's weights are read once
    if op == "fused_experts":
        return 6.0 * B * K * H * I, b * (2 * B * H + touched * 3 * H * I + 2 * B * K * I)
    # FP8 (W8A8): FP8 weights and their scales; the tokens and the intermediate also pass through FP8 copies
    weights = touched * (FP8_BYTES * 3 * H * I + SCALE_BYTES * (2 * I + H))
    activations = (b + 2 * FP8_BYTES) * (B * H + B * K * I) + b * (B * H + B * K * I)
    return 6.0 * B * K * H * I, weights + activations
