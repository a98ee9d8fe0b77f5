"""The table-driven Kernel Cost Model (KCM).

``KernelCostModel`` predicts the energy and latency of each kernel op from the per-GPU tables
that ``python -m bench.calibrate`` measures, with a host API for reports and a device-tensor
form that the router reads in its hot path without syncing the host.
"""

from costmodel.device import DeviceCostTable  # noqa: E402
from costmodel.kernel_cost_model import KernelCostModel  # noqa: E402
from costmodel.ops import OPS, ModelDims  # noqa: E402

__all__ = ["DeviceCostTable", "KernelCostModel", "ModelDims", "OPS"]
