"""Install the energy-aware MoE package: kernels, calibration, costmodel, router, bench.

The distribution is named ``energy-moe``. Its top-level import ``kernels`` collides with
Hugging Face's ``kernels`` package, so the two cannot be installed side by side.
"""
from setuptools import find_packages, setup

setup(
    name="energy-moe",
    version="0.1.0",
    description="Triton MoE/FFN/attention kernels, a measured kernel cost model and an energy-aware MoE router",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "calibration", "calibration.*", "costmodel",
                                    "costmodel.*", "router", "router.*", "bench", "bench.*"]),
    package_data={"kernels": ["configs/*/*.json"], "calibration": ["tables/*.json"]},
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10",
        "numpy>=1.26",
        "nvidia-ml-py>=12.535",
        "matplotlib>=3.8",  # the benchmark's plots
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=5.1", "hypothesis>=6.100", "transformers>=5.0,<5.25"],
                    "zeus": ["zeus>=0.16"]},
)
