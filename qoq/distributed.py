"""Tensor-parallel process groups: who this process is, and the two collectives the model needs.

A model runs unchanged without a group (`tp` None, the default everywhere): no collective, no
check beyond one `is None`. With a group of N processes (one per GPU under NCCL, or N CPU
processes under gloo, which is how the tests run), each holds 1/N of the heads, MLP columns and
vocabulary (qoq.model.tensor_parallel, docs/parallel.md), and the model calls `all_reduce` after
o_proj / down_proj / the vocab-split embedding and `all_gather` on the vocab-split logits.

Processes come from torchrun (`init_from_env` reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
LOCAL_RANK) or from `spawn` (tests, and a single-host launcher that starts its own workers).
Both set NVLINK_MULTICAST_OFF first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# NVLink multicast (NVLS / symmetric-memory multimem) is off on the machines qoq is measured on:
# their documentation says a program using it can put the host's GPUs, shared with others, out
# of service for a day or more. Set unconditionally (a value from the caller's environment is
# overwritten, never trusted) before any communicator exists: NCCL, PyTorch's symmetric memory
# and NVSHMEM read these when they initialise, and spawned workers inherit them.
NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

DEFAULT_TIMEOUT_S = 300.0  # a collective a peer never joins fails after this, instead of hanging


def disable_nvlink_multicast(env: dict | None = None) -> dict:
    """Write NVLINK_MULTICAST_OFF into `env` (os.environ by default) and return it."""
    env = os.environ if env is None else env
    env.update(NVLINK_MULTICAST_OFF)
    return env


@dataclass(frozen=True)
class TPGroup:
    """This process's place in a tensor-parallel group. `group` None: torch's default group."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (the partial outputs of a row-split linear)."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' equally shaped tensors concatenated along `dim`, rank order."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=src, group=self.group)
        return x

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def min(self, value: int, device: torch.device | str = "cpu") -> int:
        """The smallest of the ranks' values (NCCL needs `device` to be this rank's GPU)."""
        x = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return int(x.item())


def all_reduce(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """x summed over the group; x itself without one (the single-process model)."""
    return x if tp is None else tp.all_reduce(x)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(rank: int, world_size: int, init_method: str | None, backend: str | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S, local_rank: int | None = None,
                       store: dist.Store | None = None) -> TPGroup | None:
    """Join the group (None for world_size 1: no group, no communicator), met through `init_method`
    or an existing `store`. Under NCCL each process takes GPU `local_rank` (the rank by default)
    before the communicator is made."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    if world_size == 1:
        return None
    disable_nvlink_multicast()
    backend = backend or default_backend()
    select_device(backend, rank if local_rank is None else local_rank)
    dist.init_process_group(backend, init_method=init_method, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank, world_size)


def select_device(backend: str, local_rank: int) -> None:
    """Under NCCL, make GPU `local_rank` this process's (a missing GPU raises here)."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup | None:
    """The group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    (`torchrun --nproc-per-node N`, or `--nnodes` for several hosts); None when not launched so."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    return init_process_group(int(os.environ["RANK"]), world_size, "env://", backend, timeout_s,
                              int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def destroy(tp: TPGroup | None) -> None:
    if tp is not None and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world_size: int, init_method: str, backend: str | None, timeout_s: float, args) -> None:
    tp = init_process_group(rank, world_size, init_method, backend, timeout_s)
    try:
        fn(tp, *args)
    finally:
        destroy(tp)


def spawn(fn, world_size: int, *args, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run fn(tp, *args) in `world_size` new processes on this host, one group between them
    (fn must be importable: a module-level function). Raises if any rank raises; torch's spawn
    then ends the other ranks."""
    disable_nvlink_multicast()  # the children inherit it
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_worker, args=(fn, world_size, init_method, backend, timeout_s, args), nprocs=world_size, join=True)
