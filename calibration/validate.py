"""The meter check shared by calibration and the hardware monitor (numbers: ``costmodel.validate``)."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: no import at run time
    from calibration.nvml_meter import GpuMeter


def check_meter(name: str, meter: object, *attributes: str) -> "GpuMeter":
    """``meter`` has ``read()`` and ``attributes`` (a ``GpuMeter``, or a stand-in with the same calls)."""
    missing = [a for a in ("read", *attributes) if not hasattr(meter, a)]
    if missing or not callable(meter.read):
        needs = ", ".join(("read()", *attributes))
        raise TypeError(f"{name} must be a calibration.nvml_meter.GpuMeter (an object with {needs}), "
                        f"got {type(meter).__name__}")
    return meter
