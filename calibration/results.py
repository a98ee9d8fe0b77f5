"""Results are data: provenance for every results file, and atomic JSON writes."""
import datetime
import json
import os
import platform
import subprocess
import tempfile
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
    ``data`` that is not strict JSON (NaN or Infinity, which strict readers refuse; an object JSON has no form
    for) is refused before anything is written: a figure nobody knows is null, with a reason beside it."""
    path = output_path("path", path)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"data for {path} is not strict JSON ({exc}); a figure nobody knows is null, with a "
                        "reason beside it, never NaN or Infinity") from None
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
