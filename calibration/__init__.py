"""Measuring energy and latency on the user's GPU.

The NVML meter and its background sampler, the methods that turn counter readings into
per-kernel energy and latency, and the per-GPU calibrated tables (with their provenance)
that the cost model loads.
"""
