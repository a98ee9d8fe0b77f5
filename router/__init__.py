"""The energy-aware MoE router.

``EnergyAwareTTTRouter`` biases expert selection toward lower measured cost through the
routing kernel's selection-bias hook, reads the GPU's thermal and memory state from a cached
monitor, and adapts its parameters at test time.
"""
