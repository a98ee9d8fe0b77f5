"""Command-line entry points (``python -m bench.<name>``) and benchmarks.

``bench.kernels`` prints each kernel beside its torch peer; the ``bench_*.py`` files hold the
pytest-benchmark benchmarks that ``pytest --benchmark-only`` runs on a GPU.
"""
import os

import torch

if not torch.cuda.is_available():  # the one place the benches set it: before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it in @triton.jit, so the kernels run on a CPU
