"""Results are data: provenance for every results file, and atomic JSON writes."""
import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import triton


def output_path(name: str, value: object) -> Path:
    """``value`` (a str or os.PathLike) as the ``Path`` of a file to write; TypeError or ValueError naming ``name``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(value).__name__}")
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory; give a file path")
    return path


def write_json_atomic(path: "str | os.PathLike", data: object) -> None:
    """Write ``data`` as JSON to ``path`` through a temp file and rename: a crash leaves the old file intact.
    The JSON is strict: a NaN or Infinity in a dict ``data`` is written as null and named, with its value, in
    ``data["non_finite_values"]`` (a warning says so: a long GPU run keeps its results), elsewhere refused;
    an object JSON has no form for is refused, before anything is written."""
    path = output_path("path", path)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        found = {}
        cleaned = _finite_or_null(data, "", found)
        if not isinstance(data, dict):
            raise ValueError(f"data for {path} is not strict JSON ({exc}): {found}; a figure nobody knows is null, "
                             "with a reason beside it") from None
        warnings.warn(f"{path}: non-finite values written as null and listed in non_finite_values: {found}")
        text = json.dumps(cleaned | {"non_finite_values": found}, indent=2, allow_nan=False) + "\n"
    except TypeError as exc:
        raise TypeError(f"data for {path} is not JSON ({exc})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a results file is as readable as any other
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _finite_or_null(value, where, found):
    """``value`` with each NaN or Infinity replaced by None, recorded in ``found`` ({where: repr})."""
    if isinstance(value, float) and not math.isfinite(value):
        found[where or "."] = repr(value)
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def git_commit() -> "str | None":
    """The repo's HEAD commit (``-dirty`` with uncommitted changes); outside git, $GIT_COMMIT or None.

    Copies of the tree without ``.git`` (e.g. sent to a GPU machine) pass the commit in $GIT_COMMIT."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def nvidia_driver_version() -> "str | None":
    """The NVIDIA driver version from NVML, or None (with no NVML or no GPU)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing, or NVML_ERROR_* (no driver): the field is simply unknown
        return None


def provenance() -> dict:
    """Where and with what a result was measured."""
    from kernels import config_sources  # here, not at import: importing kernels fixes TRITON_INTERPRET
    on_gpu = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "driver": nvidia_driver_version() if on_gpu else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel_configs": config_sources("cuda" if on_gpu else "cpu"),  # {op: the config file its kernels read}
    }
