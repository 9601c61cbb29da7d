"""Multi-process training under ``torchrun``: PyTorch's DistributedDataParallel, NCCL on CUDA, gloo on CPU.

``torchrun --nproc_per_node N -m unmask_cli train ...`` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK set; :func:`from_env` joins them into one process group. Without those
variables (a plain ``unmask train``) everything here is a no-op for a world of one process, so the
single-process path runs the same lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from unmask_cli.errors import UnmaskError


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, samples, logs and metrics."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def device_spec(self, spec: str) -> str:
        """Each process drives its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.on and spec in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return spec

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """The module the training step calls: DDP averages its gradients over the processes."""
        if not self.on:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes (validation sums, counts)."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (a stop signal reaches the ranks at different
        batches; all of them must stop at the same one)."""
        return bool(self.sum([float(flag)])[0] > 0) if self.on else flag

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group together: a process that tears down its gloo connections while a peer
        still uses them makes that peer abort."""
        if self.on and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def from_env() -> Distributed:
    """The process group torchrun describes in the environment, joined; a world of one without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        torch.distributed.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as err:
        raise UnmaskError(f"cannot join the torchrun process group ({backend}): {err}") from err
    return Distributed(rank=rank, world=world, local_rank=local_rank, backend=backend)
