"""Reading a cost table, and checking every number the cost model will compute with.

Where tables live: a user's calibrations go to ``user_table_dir()`` (``$ENERGY_MOE_TABLES``, else
``$XDG_CACHE_HOME/energy-moe/tables``, else ``~/.cache/energy-moe/tables``), outside the installed
package, so a reinstall keeps them and the package's own tables stay as shipped. A table is
looked up by GPU name there first, then among the packaged ones (``TABLE_DIR``).

A table that loads is one the model can predict from without a NaN, an Inf, a division by zero
or a ``KeyError``: every field it reads exists and is a finite number in its physical range, and
the points it interpolates between have distinct coordinates. Anything else is a ``ValueError``
naming the file and the field.
"""
import json
import math
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from costmodel.ops import OPS, ModelDims
from costmodel.validate import ABSOLUTE_ZERO_C, MAX_BOARD_POWER_W, MAX_GPU_TEMP_C

TABLE_DIR = Path(__file__).resolve().parent.parent / "calibration" / "tables"  # the packaged tables
TABLES_ENV = "ENERGY_MOE_TABLES"


def user_table_dir() -> Path:
    """Where ``python -m bench.calibrate`` writes a user's tables (searched before ``TABLE_DIR``)."""
    if os.environ.get(TABLES_ENV):
        return Path(os.environ[TABLES_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "energy-moe" / "tables"


def table_dirs() -> list:
    """The folders searched for a GPU's table, first match wins: the user's, then the package's."""
    return [user_table_dir(), TABLE_DIR]


def table_names() -> list:
    """The GPU names that have a table in any searched folder."""
    return sorted({path.stem for folder in table_dirs() if folder.is_dir() for path in folder.glob("*.json")
                   if not path.stem.endswith(".rejected")})


def find_table(gpu_type: str) -> Path:
    """The path of ``gpu_type``'s table, the user's before the package's; a ``ValueError`` that says
    which command makes one (and names a table that differs only in case) when there is none."""
    for folder in table_dirs():
        if (folder / f"{gpu_type}.json").is_file():
            return folder / f"{gpu_type}.json"
    near = [name for name in table_names() if name.lower() == gpu_type.lower()]
    hint = f"; did you mean {near[0]!r}? (names are case-sensitive)" if near else ""
    searched = " and ".join(str(folder) for folder in table_dirs())
    raise ValueError(f"no cost table for {gpu_type} in {searched}{hint}; make one on that GPU with: "
                     f"python -m bench.calibrate --gpu {gpu_type}")


class _TableChecker:
    """Checks of one table's fields; each failure names ``path`` and the field's place in it."""

    def __init__(self, path):
        self.path = path

    def fail(self, where: str, rule: str) -> NoReturn:
        raise ValueError(f"cost table {self.path} is corrupt: {where} {rule}")

    def section(self, where: str, value: object, kind: type = dict) -> dict | list:
        if not isinstance(value, kind):
            self.fail(where, f"must be a {'mapping' if kind is dict else 'list'}, got {type(value).__name__}")
        return value

    def number(self, where: str, value: object, low: float = 0.0, low_open: bool = True,
               high: float = math.inf) -> float:
        """A finite number (never a bool) in (low, high] or [low, high]."""
        try:
            finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # an integer beyond float range
            finite = False
        if not finite:
            self.fail(where, f"must be a finite number, got {value!r}")
        if value < low or (low_open and value == low) or value > high:
            span = f"{'(' if low_open else '['}{low}, {high}]"
            self.fail(where, f"must be in {span}, got {value!r}")
        return value

    def field(self, where: str, mapping: dict, key: str, **bounds: float | bool) -> float:
        if key not in mapping:
            self.fail(where, f"has no {key!r} field")
        return self.number(f"{where}[{key!r}]", mapping[key], **bounds)

    def points(self, where: str, points: object, x_key: str, y_keys: Sequence[str], x_bounds: dict | None = None,
               group: Callable[[dict], Hashable] | None = None) -> None:
        """A non-empty list of points with distinct ``x_key`` values (within each ``group(point)``)
        and positive ``y_keys``."""
        self.section(where, points, list)
        if not points:
            self.fail(where, "has no points")
        xs = []
        for n, point in enumerate(points):
            self.section(f"{where}[{n}]", point)
            x = self.field(f"{where}[{n}]", point, x_key, **(x_bounds or {}))
            xs.append((group(point), x) if group else x)
            for key in y_keys:
                self.field(f"{where}[{n}]", point, key)
        if len(set(xs)) != len(xs):
            self.fail(where, f"has repeated {x_key} values {sorted(map(str, xs))}: interpolation needs distinct ones")


def _check_dims(check, where, dims):
    dims = check.section(where, dims)
    unknown = set(dims) - {f.name for f in fields(ModelDims)}
    if unknown:
        check.fail(where, f"has unknown fields {sorted(unknown)}")
    try:
        ModelDims(**dims)
    except (TypeError, ValueError) as exc:
        check.fail(where, str(exc))


def _check_device_facts(check, data):
    """The tile fit's optional inputs: SM count, L2 bytes, and the kernels' block configs."""
    for key in ("sm_count", "l2_cache_bytes"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            check.fail(f"{key!r}", f"must be a positive int, got {value!r}")
    for op, section in check.section("'kernel_configs'", data.get("kernel_configs") or {}).items():
        entries = check.section(f"kernel_configs[{op!r}]['entries']", check.section(
            f"kernel_configs[{op!r}]", section).get("entries"), list)
        for n, entry in enumerate(entries):
            where = f"kernel_configs[{op!r}]['entries'][{n}]"
            config = check.section(f"{where}['config']", check.section(where, entry).get("config"))
            for key, value in config.items():
                if key.startswith("block_") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    check.fail(f"{where}['config'][{key!r}]", f"must be a positive int, got {value!r}")


def _check_top_level(check, data):
    if not isinstance(data.get("gpu"), str) or not data["gpu"]:
        check.fail("'gpu'", f"must be a non-empty string, got {data.get('gpu')!r}")
    if data.get("source") not in ("measured", "prior"):
        check.fail("'source'", f"must be 'measured' or 'prior', got {data.get('source')!r}")
    for key in ("idle_power_w", "peak_flops", "hbm_bytes_per_s"):
        check.field("the table", data, key)
    if data.get("gap_power_w") is not None:
        check.field("the table", data, "gap_power_w")
    _check_dims(check, "'dims'", data.get("dims"))
    _check_device_facts(check, data)


def _check_ops(check, ops):
    check.section("'ops'", ops)
    if not ops:
        check.fail("'ops'", "is empty")
    for op, entry in ops.items():
        if op not in OPS:
            check.fail(f"ops[{op!r}]", f"is not an op the cost model knows ({', '.join(OPS)})")
        where = f"ops[{op!r}]"
        check.section(where, entry)
        for n, point in enumerate(entry.get("points") or []):
            if isinstance(point, dict) and point.get("dims") is not None:
                _check_dims(check, f"{where}['points'][{n}]['dims']", point["dims"])
        check.points(f"{where}['points']", entry.get("points"), "batch_size", ("latency_ms",),
                     group=lambda p: json.dumps(p.get("dims"), sort_keys=True))
        metered = [p for p in entry["points"] if "energy_j" not in p or p["energy_j"] is not None]
        if not metered:
            check.fail(f"{where}['points']", "has no point with a measured energy_j (latency-only points need one)")
        for n, point in enumerate(entry["points"]):
            check.field(f"{where}['points'][{n}]", point, "memory_gb", low_open=False)
            if point in metered:
                check.field(f"{where}['points'][{n}]", point, "energy_j")
            else:
                continue  # a latency-only point (energy_j null): the sweep timed it without a window
            power_w = point["energy_j"] / (point["latency_ms"] * 1e-3)
            if power_w > MAX_BOARD_POWER_W:
                check.fail(f"{where}['points'][{n}]", f"implies {power_w:.3g} W over the call, above any GPU's "
                           f"power ({MAX_BOARD_POWER_W:.0f} W): energy_j or latency_ms is in the wrong unit")


def _check_thermal(check, thermal):
    if thermal is None:
        return
    check.section("'thermal'", thermal)
    temp_bounds = {"low": ABSOLUTE_ZERO_C, "high": MAX_GPU_TEMP_C}
    ambient_c = check.field("'thermal'", thermal, "ambient_c", **temp_bounds)
    check.field("'thermal'", thermal, "resistance_c_per_w")
    check.field("'thermal'", thermal, "time_constant_s")
    thresholds = {key: check.field("'thermal'", thermal, key, low=ambient_c, high=MAX_GPU_TEMP_C)
                  for key in ("slowdown_temp_c", "shutdown_temp_c") if thermal.get(key) is not None}
    if thresholds.get("slowdown_temp_c", -math.inf) > thresholds.get("shutdown_temp_c", math.inf):
        check.fail("'thermal'", f"has slowdown_temp_c {thresholds['slowdown_temp_c']} above shutdown_temp_c "
                   f"{thresholds['shutdown_temp_c']}")
    curve = thermal.get("clock_vs_temp")
    if curve:
        check.points("thermal['clock_vs_temp']", curve, "temp_c", ("sm_clock_mhz",), x_bounds=temp_bounds)


def _check_pressure(check, section):
    if section is None:
        return
    check.section("'memory_pressure'", section)
    for op, curve in check.section("memory_pressure['ops']", section.get("ops")).items():
        where = f"memory_pressure['ops'][{op!r}]"
        points = check.section(f"{where}['points']", check.section(where, curve).get("points"), list)
        known = [p for p in points if isinstance(p, dict) and p.get("background_util") is not None]
        if known:  # points without a utilisation reading are left out of the curve
            check.points(f"{where}['points']", known, "background_util", ("stretch",),
                         x_bounds={"low": 0.0, "low_open": False, "high": 1.0})


def _check_collectives(check, section):
    """Each collective curve: a world-size key ("2"), a source, and points with distinct positive
    sizes and positive latency and energy."""
    for op, curves in check.section("'collectives'", section or {}).items():
        for world_size, curve in check.section(f"collectives[{op!r}]", curves).items():
            where = f"collectives[{op!r}][{world_size!r}]"
            if not str(world_size).isdigit() or str(int(world_size)) != str(world_size) or int(world_size) < 1:
                check.fail(where, "needs a world-size key in plain digits ('2', never '02')")
            check.section(where, curve)
            if curve.get("source") not in ("measured", "prior"):
                check.fail(where, f"needs a source 'measured' or 'prior', got {curve.get('source')!r}")
            check.points(f"{where}['points']", curve.get("points"), "bytes_per_rank", ("latency_ms", "energy_j"))


def check_table(path: "str | os.PathLike", data: dict) -> None:
    """Raise ``ValueError`` unless ``data`` is a schema-1 table the model can use throughout."""
    check = _TableChecker(path)
    if not isinstance(data, dict) or data.get("schema") != 1 or not isinstance(data.get("ops"), dict):
        check.fail("the table", "must be a schema-1 mapping with an 'ops' mapping")
    _check_top_level(check, data)
    _check_ops(check, data["ops"])
    _check_thermal(check, data.get("thermal"))
    _check_pressure(check, data.get("memory_pressure"))
    _check_collectives(check, data.get("collectives"))


def load_table(gpu_type: "str | None" = None, table: "str | os.PathLike | None" = None) -> tuple:
    """Read and check a table: by GPU name (``find_table``), or from a path."""
    path = Path(table) if table is not None else find_table(gpu_type)
    if not path.exists():
        raise ValueError(f"no cost table at {path}")
    if not path.is_file():
        raise ValueError(f"cost table {path} is not a file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cost table {path} is corrupt: {exc}") from exc
    check_table(path, data)
    if gpu_type is not None and data["gpu"] != gpu_type:
        raise ValueError(f"cost table {path} is for GPU {data['gpu']!r}, not {gpu_type!r}")
    if (data.get("thermal") or {}).get("clock_vs_temp"):  # the model interpolates it from cold to hot
        data["thermal"]["clock_vs_temp"] = sorted(data["thermal"]["clock_vs_temp"], key=lambda p: p["temp_c"])
    return data, path
