"""Distributed data parallel set-up for ``torchrun --nproc_per_node N -m convzoo train ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and joins the process group: NCCL when the processes
run on GPUs, Gloo on CPU. Without them everything runs as a single process.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among ``world_size`` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = pick_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _logger.info("rank %d of %d on %s (%s)", rank, world_size, target, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group once the models using it are unreachable.

    A DistributedDataParallel model keeps the group alive; if its last reference went only at
    interpreter exit, Gloo's worker threads would be torn down by a C++ destructor then and
    abort the process. Call this after the models are out of scope.
    """
    if info.enabled and dist.is_initialized():
        gc.collect()  # DDP models caught in reference cycles release the group now
        dist.destroy_process_group()


def all_reduce_sum(values: List[float], info: DistInfo) -> List[float]:
    """Sum a list of numbers over all ranks (identity on one process)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def parameters_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """Whether every rank holds exactly the same parameters and buffers as rank 0."""
    if not info.enabled:
        return True
    flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values() if t.is_floating_point()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(flat, reference))], device=info.device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    return bool(differs.item() == 0.0)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each training forward only, so after the last step
    each rank holds the statistics of its own last batch; validation and the checkpoint use
    rank 0's on every rank after this.
    """
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module, info: DistInfo, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when running distributed (with SyncBatchNorm if asked)."""
    if not info.enabled:
        return model
    if sync_bn and info.device.type == "cpu":
        raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
