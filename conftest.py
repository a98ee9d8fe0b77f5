"""Repo-wide pytest set-up: without a CUDA device, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before the
``kernels`` package is imported, which is why it lives in the root conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
