"""The benchmarks' process group: joining it under torchrun, and gathering or reducing results."""
import os

import torch
import torch.distributed as dist

from calibration.collectives import all_reduce_floats


def init_distributed(device: torch.device, always: bool = False) -> tuple:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1), or with ``always`` (a group of one
    without torchrun), joins the process group on ``device``: NCCL on a GPU, gloo on a CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not always:
        return 0, 1
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531")):
        os.environ.setdefault(key, default)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)
    return dist.get_rank(), dist.get_world_size()


def gather_to_rank0(entry: object, world: int) -> list | None:
    """Every rank's ``entry`` as a list on rank 0 (in rank order), None on the others."""
    if world == 1:
        return [entry]
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(entry, gathered, dst=0)
    return gathered


def _all_reduce(value, op):
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    return all_reduce_floats([float(value)], op, None, device)[0]


def slowest(value: float) -> float:
    """The maximum of ``value`` over the ranks."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def summed(value: float) -> float:
    """The sum of ``value`` over the ranks."""
    return _all_reduce(value, dist.ReduceOp.SUM)
