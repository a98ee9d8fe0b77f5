"""The harness's corpus and checkpoints: the Python standard library's own source, split by file.

The corpus is on every machine with no download: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (installed packages in ``site-packages``/``dist-packages``
left out). The held-out split is by file: a file is held out when the SHA-256 of its path
relative to the stdlib root falls in the lowest ``HELDOUT_PERCENT`` of hash values, so the split
is the same on every run and every machine with the same stdlib, and no held-out byte is ever
trained on. Evaluation (``evaluate``) reads the longest held-out files front to back in windows of
``seq_length`` (each window its own context), so a model that adapts at test time sees each file
in order. Checkpoints are written atomically and named by their dims (``checkpoint_path``).
"""
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT_PERCENT = 5
EXCLUDED_DIRS = frozenset(("site-packages", "dist-packages"))  # installed packages, not the stdlib
LOG_EVERY = 50


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list:
    """The corpus: relative POSIX paths of the ``.py`` files under ``root``, sorted."""
    root = Path(root)
    paths = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(p.as_posix() for p in paths if not EXCLUDED_DIRS & set(p.parts))


def is_heldout(relative_path: str) -> bool:
    """Deterministic by-file split: the path's SHA-256, as a number, in the lowest HELDOUT_PERCENT."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def split_by_file(relative_paths: list) -> tuple:
    """(train, held-out) lists of relative paths."""
    heldout = [p for p in relative_paths if is_heldout(p)]
    return [p for p in relative_paths if not is_heldout(p)], heldout


def read_stream(root: Path, relative_paths: list) -> torch.Tensor:
    """The files' bytes, concatenated, as a uint8 tensor."""
    data = b"".join((Path(root) / p).read_bytes() for p in relative_paths)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def heldout_streams(root: Path, heldout: list, budget_bytes: int, min_bytes: int = 2) -> list:
    """The longest ``heldout`` files (each a uint8 tensor), front parts kept, up to ``budget_bytes`` in all."""
    streams = []
    for path in sorted(heldout, key=lambda p: (-(Path(root) / p).stat().st_size, p)):
        left = budget_bytes - sum(len(s) for s in streams)
        if left < min_bytes:
            break
        stream = read_stream(root, [path])[:left]
        if len(stream) >= min_bytes:
            streams.append(stream)
    return streams


def corpus_summary(root: Path, train: list, heldout: list) -> dict:
    listing = hashlib.sha256("\n".join(train + ["--"] + heldout).encode()).hexdigest()[:16]
    return {"root": str(root), "python": sys.version.split()[0], "train_files": len(train),
            "heldout_files": len(heldout), "heldout_percent": HELDOUT_PERCENT, "file_list_sha256_16": listing}


@torch.no_grad()
def evaluate(model: torch.nn.Module, streams: list, seq_length: int, device: torch.device) -> dict:
    """Held-out bits per byte and perplexity: each stream front to back in windows of
    ``seq_length`` predictions, one window per forward (in order, so test-time training is causal)."""
    nats, predicted = 0.0, 0
    for stream in streams:
        stream = stream.to(device=device, dtype=torch.long)
        for start in range(0, len(stream) - 1, seq_length):
            window = stream[start:start + seq_length + 1][None]  # [1, S + 1]
            logits = model(window[:, :-1])
            nats += F.cross_entropy(logits.float()[0], window[0, 1:], reduction="sum").item()
            predicted += window.shape[1] - 1
    if predicted == 0:
        return {"bits_per_byte": None, "perplexity": None, "bytes": 0, "files": len(streams),
                "reason": "no held-out bytes"}
    bits = nats / predicted / math.log(2)
    return {"bits_per_byte": bits, "perplexity": 2.0 ** bits, "bytes": predicted, "files": len(streams)}


def checkpoint_path(directory: Path, moe: bool, d_model: int, num_layers: int, num_experts: int, top_k: int,
                    d_ff: int | None = None) -> Path:
    """``dense_d256_L4.pt`` / ``moe_d256_L4_E4k2.pt``; a d_ff other than 4 d_model is named (``_f1024``)."""
    name = f"moe_d{d_model}_L{num_layers}_E{num_experts}k{top_k}" if moe else f"dense_d{d_model}_L{num_layers}"
    if d_ff is not None and d_ff != 4 * d_model:
        name += f"_f{d_ff}"
    return Path(directory) / f"{name}.pt"


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict) -> None:
    """``torch.save`` through a temp file and rename: a crash leaves the old checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        plain_meta = json.loads(json.dumps(meta))  # plain JSON types: weights_only loading refuses others
        torch.save({"meta": plain_meta, "state_dict": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load ``path``'s weights into ``model`` (its dims must match); the checkpoint's meta."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint["meta"]


