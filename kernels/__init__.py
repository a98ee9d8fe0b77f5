"""Triton kernels, their launchers, and a pure-torch reference beside each.

MoE ops: top-k routing with a selection-bias hook (``route``), baseline-preserving re-routing
(``policy_routing``: keep each token's best experts, fill its other slots by cost or from the
batch's active set), the fused experts (``fused_experts``, transformers' ``MixtralExperts``
semantics; ``gpt_oss_experts``, gpt-oss's; ``fp8_experts`` with FP8 weights, and
``quantize_fp8``, per-row FP8 quantization) and the drop-in ``FusedMoE`` layer with
``patch_hf_model``. Dense ops: the SwiGLU FFN (fused gate+up with SiLU·up in the epilogue, and the single
projections ``ffn_gate``/``ffn_up``/``ffn_down`` the cost model calibrates), a plain GEMM, and
attention (FlashAttention forward plus standalone QKᵀ and softmax·V). Block sizes come from the
per-GPU JSON files in ``kernels/configs``. ``route``, ``policy_routing``, ``fused_experts``,
``gpt_oss_experts``, ``fp8_experts``, ``quantize_fp8``, ``swiglu_ffn``, ``flash_attention`` and ``gather_sum`` run as
``torch.library`` custom ops (``kernels._library``), so ``torch.compile(fullgraph=True)`` traces
around them. On a machine without CUDA the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``), slowly.

Each op's module follows one pattern (``kernels/matmul.py``, ``attention.py``, ``routing.py``,
``policy_routing.py``, ``expert_blocks.py``, ``fused_experts.py``, ``gpt_oss_experts.py``, ``gather_sum.py``,
...): the Triton kernel ``_<op>_kernel`` with shape comments; its launcher ``launch_<op>`` on already-checked inputs,
which reads its block config by key from ``kernels.config.lookup("<config key>", ...)``
(``configs/<config key>/<GPU>.json``); the custom op (``kernels._library.kernel_op``: fake and
reference autograd); the public function ``<op>``, which checks its arguments
(``kernels.validate``) and calls the op; and ``<op>_reference``, the same in torch. Its tests are
``tests/test_<module>.py`` (the plain GEMM under the SwiGLU kernels' ``tests/test_swiglu.py``)
and its benchmarks in ``bench/bench_kernels.py`` / ``bench_moe.py``, by the op's name. The GEMM
tile helpers are public in ``kernels.tiles``; ``TRITON_INTERPRET`` is set once, by
``tests/conftest.py`` and ``bench/__init__.py``.

This package's import name, ``kernels``, is also Hugging Face's ``kernels`` package: the two
cannot be installed side by side.
"""
from kernels.config import config_entries, config_sources
from kernels._name_clash import warn_if_hub_kernels_installed
from kernels.attention import attention_av, attention_qk, flash_attention
from kernels.decode_attention import decode_attention
from kernels.fp8_experts import fp8_experts, quantize_fp8_weights
from kernels.fused_experts import fused_experts
from kernels.gpt_oss_experts import gpt_oss_experts
from kernels.matmul import matmul
from kernels.moe_layer import FusedMoE, TopKRouter, patch_hf_model, register_hf_experts_implementation
from kernels.policy_routing import policy_routing
from kernels.quantize import quantize_fp8
from kernels.routing import route
from kernels.swiglu import ffn_down, ffn_gate, ffn_up, swiglu_ffn, swiglu_gate_up

__version__ = "0.1.0"

warn_if_hub_kernels_installed()

__all__ = [
    "attention_av", "attention_qk", "decode_attention", "flash_attention", "matmul",
    "ffn_down", "ffn_gate", "ffn_up", "swiglu_ffn", "swiglu_gate_up",
    "FusedMoE", "TopKRouter", "fp8_experts", "fused_experts", "gpt_oss_experts", "quantize_fp8", "quantize_fp8_weights",
    "patch_hf_model", "policy_routing", "register_hf_experts_implementation",
    "config_entries", "config_sources", "route",
]
