"""The energy-aware MoE router.

``EnergyAwareTTTRouter`` biases expert selection toward lower measured cost through the
routing kernel's selection-bias hook (gate weights stay the unbiased probabilities), reads the
GPU's thermal and memory state from a ``HardwareMonitor``'s cache (never NVML in its forward),
and adapts its bias offsets, and optionally its gate weight, at test time from past batches.
``OEARouter`` is the published peer it is measured against (Opportunistic Expert Activation).
"""
from router.energy_router import EnergyAwareTTTRouter
from router.monitor import HardwareMonitor
from router.oea import OEARouter

__all__ = ["EnergyAwareTTTRouter", "HardwareMonitor", "OEARouter"]
