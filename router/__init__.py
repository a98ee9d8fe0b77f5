"""The MoE routers: one family on one contract.

The contract is ``kernels.TopKRouter``'s (an [E, H] ``weight``, ``top_k``, and a forward from
hidden_states [T, H] to router_logits [T, E], topk_weights [T, K], topk_ids [T, K] int32), and
``kernels.FusedMoE`` takes any module with it. Its base class stays in ``kernels`` because
``FusedMoE`` builds one by default and ``kernels`` imports nothing of ours; it is re-exported
here as ``router.TopKRouter``. On it:

- ``OEARouter`` (``router/oea.py``): the published peer, Opportunistic Expert Activation.
- ``EnergyAwareTTTRouter`` (``router/energy_router.py``): selection biased toward lower
  measured cost, composed of its cost part (``router/cost.py``), test-time training
  (``router/ttt.py``), expert placement (``router/placement.py``) and argument checks
  (``router/options.py``). It reads the GPU's thermal and memory state from a
  ``HardwareMonitor``'s cache (``router/monitor.py``), never NVML in its forward.

No router re-implements a routing kernel: all call ``kernels.routing`` / ``kernels.policy_routing``.
"""
from kernels.moe_layer import TopKRouter
from router.energy_router import EnergyAwareTTTRouter
from router.monitor import HardwareMonitor
from router.oea import OEARouter

__all__ = ["EnergyAwareTTTRouter", "HardwareMonitor", "OEARouter", "TopKRouter"]
