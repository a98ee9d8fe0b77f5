"""Our ``kernels`` package shares its import name with Hugging Face's ``kernels``.

transformers probes that name and accepts HF's versions 0.17.x as its own; ours must never be
mistaken for it, and ``import transformers`` must keep working beside ours.
"""
import pytest

import kernels

transformers = pytest.importorskip("transformers", reason="transformers is not installed here")


def test_transformers_does_not_take_ours_for_hf_kernels():
    from transformers.utils import is_kernels_available
    assert kernels.__file__.endswith("kernels/__init__.py")
    assert not is_kernels_available(), "transformers treats our kernels package as Hugging Face's"


def test_transformers_hub_kernels_integration_imports():
    import transformers.integrations.hub_kernels  # noqa: F401 (it probes the name 'kernels')
