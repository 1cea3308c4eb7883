"""Process-group bootstrap that works under plain `python`, `torchrun`, the `deepspeed` launcher and
multi-node launchers (env MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), on CUDA (nccl) or
CPU (gloo, with DeepSpeed's CPU accelerator selected via DS_ACCELERATOR=cpu before deepspeed loads)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_env(local_rank: int | None = None) -> None:
    """Call before importing deepspeed: pick its CPU accelerator when there is no CUDA, and record a
    `--local_rank` handed over on the command line (deepspeed launcher) as LOCAL_RANK."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (1 process without one)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(engine_kind: str, device_pref: str = "auto") -> DistInfo:
    """Initialise the process group for DeepSpeed runs (also for one process, so the same code path
    runs everywhere); the single engine runs without one."""
    rank, local_rank, world = env_world()
    device = pick_device(device_pref, local_rank)
    if engine_kind == "deepspeed" and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python -m train engine=zero2`: a 1-process group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                              LOCAL_RANK="0", WORLD_SIZE="1")
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, minutes on 2 cores, per
            # install path) that only its inference tensor parallelism calls; training uses the gloo group
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
    return DistInfo(rank, local_rank, world, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
