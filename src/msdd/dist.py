"""torch.distributed helpers: the same code runs as one plain process or under torchrun / SLURM.

`init_distributed()` reads the launcher's environment (torchrun: RANK / WORLD_SIZE / LOCAL_RANK;
SLURM: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with MASTER_ADDR / MASTER_PORT set by the job
script) and starts a process group: NCCL on GPUs, gloo on CPU. Without a launcher it does nothing
and reports rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for n in names:
        if n in os.environ:
            try:
                return int(os.environ[n])
            except ValueError:
                raise ValueError(f"environment variable {n}={os.environ[n]!r} is not a whole number; unset it or set "
                                 "it as the launcher would") from None
    return None


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    if world == 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    # user errors (exit 2), checked before the environment is touched: what a single-process command inside an
    # salloc / srun shell meets
    launch = ("launch with torchrun, export them in the SLURM job script (MASTER_ADDR=$(scontrol show hostnames | "
              "head -n1)), or for one process unset SLURM_NTASKS")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError(f"{world} processes asked for (WORLD_SIZE / SLURM_NTASKS) but MASTER_ADDR/MASTER_PORT are not "
                         f"set: {launch}")
    if rank is None:
        raise ValueError(f"{world} processes asked for (WORLD_SIZE / SLURM_NTASKS) but no RANK / SLURM_PROCID: "
                         f"{launch}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        raise ValueError(f"--device {device} under {world} processes would put every process on GPU {dev.index}: "
                         "pass --device cuda (each process takes the GPU of its local rank)")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(local_gpu(local))
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def local_gpu(local_rank: int) -> int:
    """The GPU index of the process of local rank `local_rank`: the rank itself where every process sees all the node's
    GPUs (torchrun), modulo the GPUs it sees where the launcher gives each its own (SLURM's --gpus-per-task=1 leaves
    one visible GPU, index 0, to each)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def process_device(device: str | torch.device, info: DistInfo) -> torch.device:
    """This process's device: a bare "cuda" becomes the GPU of its local rank (`local_gpu`)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_gpu(info.local_rank))
    return dev


def setup(device: str | torch.device = "cpu") -> tuple[DistInfo, torch.device]:
    """`init_distributed`, plus this process's device (`process_device`)."""
    info = init_distributed(device)
    return info, process_device(device, info)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes, in place (a no-op in a single process)."""
    if _active():
        dist.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] in a single process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors) -> None:
    """Overwrite `tensors` in place with rank 0's values."""
    if _active():
        for t in tensors:
            dist.broadcast(t, src=0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
