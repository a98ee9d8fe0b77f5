"""Our ``kernels`` package shares its import name with Hugging Face's ``kernels``.

transformers probes that name (by the distribution's version) and imports HF's API from it; ours must never be
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


def test_import_warns_when_hugging_faces_kernels_is_installed_too(monkeypatch):
    import importlib.metadata

    from kernels._name_clash import warn_if_hub_kernels_installed
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.1" if name == "kernels" else "1.0")
    with pytest.warns(RuntimeWarning, match="Hugging Face's `kernels` 0.19.1 is installed beside energy-moe"):
        warn_if_hub_kernels_installed()


def test_no_hugging_face_kernels_distribution_here():
    import importlib.metadata
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")
