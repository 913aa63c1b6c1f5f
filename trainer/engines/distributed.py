"""Small helpers over ``torch.distributed`` for data-parallel learning; no-ops in one process.

A run is distributed when a launcher started it: ``torchrun --nproc_per_node N`` and
``deepspeed --num_gpus N`` (on a CPU: ``deepspeed --num_accelerators N``) both set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
``init_distributed`` reads them. Without them there is one rank, world size 1, no
process group, and every helper below returns at once, so single-process code calls
them unconditionally.

Invariants:

- ``init_distributed``, ``barrier``, ``broadcast_object``, ``scatter_batch`` and
  ``all_reduce_metrics`` are **collective**: when the world is larger than one, every
  rank must call them, in the same order, or the run hangs (gloo and NCCL match calls
  by order, not by name). ``rank``, ``world_size`` and ``is_main`` are local.
- Rank 0 is the main rank: it alone generates, logs, publishes weights and writes files
  that are not per-rank.
- ``scatter_batch`` gives every rank ``batch.shard(rank, world)``: equal row counts and
  the whole batch's ``num_sequences`` / ``num_tokens``, so the shards' losses sum to the
  batch loss and every rank runs the same number of micro-batches (the collectives of a
  ZeRO step line up).

The process group is made by ``torch.distributed.init_process_group`` (gloo on CPU,
NCCL on CUDA); DeepSpeed adopts an existing group in ``deepspeed.initialize`` (its
``init_distributed`` wraps it rather than making another), so both launchers and both
learners share this one entry point.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from rlvr.trainer.algorithm.batch import TrainBatch

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun and the deepspeed launcher set in every process they start."""


def launched() -> bool:
    """Whether a distributed launcher started this process (all of ``LAUNCHER_ENV`` set)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def backend_for(device: torch.device) -> str:
    """Return the collective backend for ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the launcher's process group (collective); return (rank, world size).

    Without a launcher (or when a group already exists) nothing is created and the
    current (rank, world size) is returned: (0, 1) in a plain process. On CUDA each
    rank takes the GPU ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return rank(), world_size()
    if not launched():
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend_for(device))  # env:// reads LAUNCHER_ENV
    return rank(), world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Return the number of ranks (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this is rank 0, the rank that generates, logs and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (collective; no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (collective; pickled, keep it small)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def scatter_batch(batch: TrainBatch | None, src: int = 0) -> TrainBatch:
    """Give every rank its shard of the batch rank ``src`` holds (collective).

    Other ranks pass None. The shards travel pickled through ``scatter_object_list``
    (works on gloo and NCCL; a batch of token ids is small next to a model step). A batch
    whose size does not divide by the world size raises on rank ``src``, and the other
    ranks then wait until the collective times out: keep ``prompts_per_step *
    group_size`` a multiple of the world size (the trainer checks it at setup).
    """
    world = world_size()
    if world == 1:
        if batch is None:
            raise ValueError("scatter_batch in one process needs the batch")
        return batch
    shards = None
    if rank() == src:
        if batch is None:
            raise ValueError(f"scatter_batch: rank {src} holds the batch but passed None")
        shards = [batch.shard(r, world).to("cpu") for r in range(world)]
    out: list[Any] = [None]
    dist.scatter_object_list(out, shards, src=src)
    return out[0]


def all_reduce_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Combine per-rank metric sums into the whole batch's (collective).

    ``*_max`` keys take the maximum over ranks, ``*_min`` keys the minimum, every other
    key the sum: callers pass sums (token-weighted sums, token counts, losses that are
    already normalised by whole-batch counts) and divide afterwards. Every rank must
    pass the same keys. Reduced in float64 so sums of many tokens stay exact enough.
    """
    if world_size() == 1:
        return dict(sums)
    keys = sorted(sums)
    out: dict[str, float] = {}
    for op, pick in (
        (dist.ReduceOp.MAX, lambda k: k.endswith("_max")),
        (dist.ReduceOp.MIN, lambda k: k.endswith("_min")),
        (dist.ReduceOp.SUM, lambda k: not k.endswith(("_max", "_min"))),
    ):
        chosen = [k for k in keys if pick(k)]
        if not chosen:
            continue
        values = torch.tensor([sums[k] for k in chosen], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(values, op=op)
        out.update(zip(chosen, values.tolist()))
    return out


def _collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
