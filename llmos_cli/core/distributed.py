"""Several processes, one run: torch.distributed set up from torchrun's environment.

llmos never launches workers itself: torchrun (or `accelerate launch`, or `llmos ... --nproc N`,
which runs torchrun's agent: see launch.py) starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/MASTER_PORT. Each process then runs the same stage; this module decides the pieces
that differ: the process group (NCCL on CUDA, gloo on CPU), the model wrapper (DDP or FSDP2) and
which rows of every step this rank trains on. full_state.py gathers sharded states for saving.

Batch semantics: `train.batch_size` x `train.grad_accum` rows make one optimizer step on any
number of processes. Every rank draws the same global step and trains on its 1/N slice of it,
so N processes follow the loss curve of one process, and a checkpoint resumes on any N.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llmos_cli.console import configure, out
from llmos_cli.core.runtime import Precision
from llmos_cli.core.train.batches import ResumableBatchSampler
from llmos_cli.core.train.signals import StopRequest
from llmos_cli.errors import UserError

# Rank 0 may prepare data while the others wait in a barrier; allow for a long preparation.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=int(os.environ.get("LLMOS_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process logs, shows progress and writes files."""
        return self.rank == 0

    def sum(self, value: Any) -> Any:
        """Sum a number (int or float) or a tensor over all ranks; a tensor is summed in place."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: Any) -> Any:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: Any, op: Any) -> Any:
        if self.size == 1:
            return value
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value, op=op)
            return value
        t = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.long)
        dist.all_reduce(t, op=op)
        return t.item()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank (a picklable object of our own making)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first (e.g. preparing data), then on the others (reusing it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> World:
    """Join the process group that torchrun's environment describes; one process: nothing to do.

    Backend: NCCL for CUDA tensors with gloo for CPU ones on GPU machines, gloo alone on CPU.
    Other ranks go quiet: only rank 0 prints status lines, progress and results.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        return current_world()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {local_rank} of this machine has no GPU: it has {torch.cuda.device_count()}",
                hint="start at most one process per GPU (--nproc / --nproc_per_node)",
            )
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    atexit.register(_leave)
    world = current_world()
    if not world.is_main:
        configure(json_mode=False, quiet=True)
    else:
        out.info(f"distributed: {world.size} processes ({backend})")
    return world


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- launching


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The torchrun command that runs `llmos ARGS` as `nproc` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single-node rendezvous on a free local port
        f"--nproc_per_node={nproc}",
        "-m",
        "llmos_cli",
        *args,
    ]


# ---------------------------------------------------------------- model


def wrap_model(
    model: torch.nn.Module, mode: str, precision: Precision, device: torch.device
) -> torch.nn.Module:
    """The module to run forward/backward through: DDP, FSDP2 (sharded in place) or `model` itself.

    `auto` is DDP: each rank holds the whole model and gradients are all-reduced. `fsdp` shards
    parameters, gradients and optimizer state, one FSDP unit per decoder layer.
    """
    world = current_world()
    if world.size == 1:
        return model
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        if device.type != "cuda":
            return DistributedDataParallel(model)
        index = device.index if device.index is not None else torch.cuda.current_device()  # LOCAL_RANK's
        return DistributedDataParallel(model, device_ids=[index])
    return shard_model(model, precision, device, world)


def shard_model(model: torch.nn.Module, precision: Precision, device: torch.device, world: World) -> Any:
    """FSDP2: one unit per block class the model names in `_no_split_modules`, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision.needs_scaler:
        raise UserError(
            "train.precision: fp16 is not supported with train.distributed=fsdp; use bf16 (or fp32)"
        )
    # bf16: gather and compute in bf16, reduce gradients in fp32; the sharded master weights stay fp32.
    policy = MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
    mesh = init_device_mesh(device.type, (world.size,))
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        out.warn(
            f"fsdp: {type(model).__name__} names no decoder-layer class (_no_split_modules); "
            "sharding it as one unit, which saves less memory"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if is_sharded(wrapped):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` over all ranks' shards; returns the norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def agree_on_stop(stop: StopRequest, world: World) -> bool:
    """Whether every rank stops after this step: a signal may reach the ranks a step apart, and all
    stop at the step where any of them saw it. A signal arriving during the vote counts next step."""
    if world.size == 1:
        return stop.requested
    agreed = world.max(stop.signum or 0)
    if agreed and stop.signum is None:
        stop.signum = agreed  # another rank's signal: stop here too, under its name
    return bool(agreed)


# ---------------------------------------------------------------- data


class ShardedBatchSampler:
    """This rank's micro-batches: its 1/N slice of every global step, in the one-process order.

    A global step is `grad_accum` consecutive micro-batches of the global sampler. Every rank
    draws the same step, concatenates its rows, keeps its contiguous 1/N and cuts that into
    micro-batches of at most `batch_size` rows. With one process this yields exactly the global
    sampler's batches, so single-process runs (and their exact resume) are unchanged.
    """

    def __init__(self, sampler: ResumableBatchSampler, grad_accum: int, world: World):
        step_rows = sampler.batch_size * grad_accum
        if step_rows % world.size:
            raise UserError(
                f"train.batch_size x train.grad_accum = {step_rows} rows per step do not split evenly "
                f"over {world.size} processes",
                hint=f"make batch_size x grad_accum a multiple of {world.size}",
            )
        self.sampler, self.grad_accum, self.world = sampler, grad_accum, world
        self.rows_per_rank = step_rows // world.size
        self.micro_per_step = math.ceil(self.rows_per_rank / sampler.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.sampler)
        start = self.world.rank * self.rows_per_rank
        while True:
            rows = [i for _ in range(self.grad_accum) for i in next(batches)]
            mine = rows[start : start + self.rows_per_rank]
            for k in range(0, self.rows_per_rank, self.sampler.batch_size):
                yield mine[k : k + self.sampler.batch_size]
