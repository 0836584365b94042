"""Data-parallel training with torch.distributed (``torchrun --nproc_per_node N -m sss_lib train``).

Design (so that N processes x batch B/N give the same step as 1 process x batch B):

* every process draws the *whole* global batch from the same seeded generators, and works on its
  contiguous share (:meth:`DistContext.shard`); every loss is a mean of per-sample terms, so the
  mean over processes of the per-process means is the global mean;
* after ``backward`` the gradients are averaged with one all-reduce over a flat buffer
  (:meth:`DistContext.average_gradients`); a parameter no process produced a gradient for keeps
  ``grad = None``, exactly as in a single process, so AdamW skips it the same way;
* only rank 0 writes files and progress; stop requests are OR-ed over processes every step, so
  all stop at the same step.

gloo on a CPU, nccl on CUDA (each process on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Sequence, TypeVar

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass
class DistContext:
    """Where this process stands in a data-parallel run (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def check_divisible(self, name: str, value: int) -> None:
        """Refuse a global batch size that the processes cannot share equally."""
        if value % self.world:
            raise InputError(None, f"{name} = {value} cannot be split over {self.world} processes",
                             f"Use a multiple of {self.world} (the batch is shared equally).")

    def bounds(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this process's share of ``n`` items (``n`` divisible by the world)."""
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of a global batch."""
        start, stop = self.bounds(len(items))
        return list(items[start:stop])

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over processes (no-op for one process); see the module docstring."""
        if not self.distributed or not params:
            return
        import torch.distributed as dist

        ref = params[0]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=ref.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        dist.all_reduce(has)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, seen in zip(params, has.tolist()):
            n = p.numel()
            if seen:
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            else:
                p.grad = None
            offset += n

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True when ``flag`` is True on any process."""
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
        """Each value averaged over processes (NaN stays NaN); for logging only."""
        if not self.distributed or not values:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str) -> tuple[DistContext, str]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else a single-process context.

    Returns the context and the device this process should use (``cuda:LOCAL_RANK`` on CUDA).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        backend = "nccl"
    else:
        device = "cpu" if device == "auto" else device
        backend = "gloo"
    if not dist.is_initialized():
        # Rank 0 validates alone while the others wait at the next all-reduce: allow for a long validation.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=3))
    log.info("process %d of %d (%s, %s)", rank, world, backend, device)
    return DistContext(rank, world, local, True), device


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.initialised:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
