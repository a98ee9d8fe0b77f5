"""Command-line entry points (``python -m bench.<name>``) and benchmarks.

``bench.kernels`` prints each kernel beside its torch peer; the ``bench_*.py`` files hold the
pytest-benchmark benchmarks that ``pytest --benchmark-only`` runs on a GPU.
"""
