"""Number checks shared by the cost model, calibration and the hardware monitor, and the physical limits they use.

Each check raises ``TypeError`` (wrong kind) or ``ValueError`` (a value outside its rule) whose
message names the argument and the rule; numpy scalars pass as the Python numbers they hold.
"""
import math
import numbers

ABSOLUTE_ZERO_C = -273.15
MAX_GPU_TEMP_C = 200.0  # far above any shutdown threshold: a hotter reading is a broken sensor
MAX_BOARD_POWER_W = 10_000.0  # far above any board's limit (a wrapped NVML milliwatt counter reads ~4.3 MW)


def real(name: str, value: object) -> float:
    """``value`` as a float: Python and numpy reals, never a bool or a str."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int too large for a float") from None


def finite_number(name: str, value: object, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                  why: str = "") -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``low_open``); ``why`` explains the rule."""
    number = real(name, value)
    if not math.isfinite(number) or number < low or (low_open and number == low) or number > high:
        if low == -math.inf and high == math.inf:
            rule = "a finite number"
        elif high == math.inf:
            rule = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            rule = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {rule}{why}, got {value!r}")
    return number


def count(name: str, value: object, low: int = 1) -> int:
    """``value`` as an int >= ``low``: Python and numpy integers, never a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)
