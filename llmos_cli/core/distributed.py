"""Several processes, one run: torch.distributed set up from torchrun's environment.

llmos never launches workers itself: torchrun (or `accelerate launch`, or `llmos ... --nproc N`,
which runs torchrun's agent: see launch.py) starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/MASTER_PORT. Each process then runs the same stage; this module decides the pieces
that differ: the process group (NCCL on CUDA, gloo on CPU), the model wrapper (DDP or FSDP2),
which rows of every step this rank trains on, and world-size-independent checkpoints.

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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmos_cli.console import configure, out
from llmos_cli.core.batches import ResumableBatchSampler
from llmos_cli.core.checkpoint import load_checkpoint as load_checkpoint_files
from llmos_cli.core.checkpoint import save_checkpoint as save_checkpoint_files
from llmos_cli.core.runtime import Precision
from llmos_cli.core.signals import StopRequest
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


# ---------------------------------------------------------------- checkpoints


class _StateSnapshot:
    """A gathered state dict standing in for a module or optimizer when writing a checkpoint."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


class _FullStateModel:
    """A sharded FSDP module seen through full (unsharded) state dicts, as the checkpoint files hold."""

    def __init__(self, model: Any):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model, everywhere=True)

    def load_state_dict(
        self, state: dict[str, torch.Tensor], strict: bool = False
    ) -> tuple[list[str], list[str]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Report keys as nn.Module.load_state_dict does (a tied name absent from the file is missing).
        names = self.model.state_dict().keys()
        missing, unexpected = [k for k in names if k not in state], [k for k in state if k not in names]
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, dict(state), options=options)  # it may add tied names to the dict
        return missing, unexpected


class _FullStateOptimizer:
    """An optimizer over FSDP-sharded parameters seen through its full (unsharded) state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self, everywhere: bool = True) -> dict[str, Any]:
        keep = everywhere or current_world().is_main
        state = _gather(self.optimizer.state_dict(), keep)
        return state if keep else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded = {}
        for index, values in state["state"].items():
            p = params[int(index)]
            sharded[index] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
                else v
                for k, v in values.items()
            }
        self.optimizer.load_state_dict({**state, "state": sharded})


def _gather(obj: Any, keep: bool) -> Any:
    """Replace every DTensor shard in a (nested) state dict with the full tensor, on the CPU if `keep`.

    Every rank takes part in each all-gather; a rank that does not keep the result drops it at once,
    so only the ranks that need it hold a full copy in host memory.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        full = obj.full_tensor()
        return full.cpu() if keep else None
    if isinstance(obj, dict):
        return {k: _gather(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_gather(v, keep) for v in obj]
    return obj


def full_state_dict(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The model's complete state dict. FSDP shards are gathered (a collective: call on every rank)
    into host memory on rank 0, or on `everywhere`; the other ranks get an empty dict.

    Tied parameters (e.g. embeddings and LM head) are gathered once and stay one tensor, so the
    file holds them once, as a single-process save would.
    """
    state = model.state_dict()
    if not is_sharded(model):
        return state
    keep = everywhere or current_world().is_main
    first_name: dict[int, str] = {}
    alias = {
        name: first_name.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)
    }
    gathered: dict[str, torch.Tensor] = {}
    full = {}
    for name, value in state.items():
        key = alias.get(name, name)
        if key not in gathered:
            gathered[key] = _gather(value, keep)
        full[name] = gathered[key]
    return full if keep else {}


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors, tied ones once. FSDP shards are gathered (a
    collective: call on every rank) and only rank 0 gets them; the other ranks get an empty dict."""
    keep = current_world().is_main
    weights = {}
    for name, p in model.named_parameters():  # in the same order on every rank: one gather each
        if p.requires_grad:
            full = _gather(p.data, keep) if is_sharded(model) else (p.detach().cpu() if keep else None)
            if keep:
                weights[name] = full.contiguous()
    return weights


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a full (unsharded) state dict non-strictly, into a sharded model too; (missing, unexpected)."""
    if is_sharded(model):
        return _FullStateModel(model).load_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def save_checkpoint(
    world: World,
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a world-size-independent checkpoint: full states, written by rank 0 alone."""
    if is_sharded(model):  # every rank takes part in gathering the shards
        model_view: Any = _StateSnapshot(full_state_dict(model))
        optimizer_view: Any = _StateSnapshot(_FullStateOptimizer(optimizer).state_dict(everywhere=False))
    else:
        model_view, optimizer_view = model, optimizer
    target = root / f"step-{step}"
    if world.is_main:
        target = save_checkpoint_files(root, step, model_view, optimizer_view, scheduler, state, keep_last)
    world.barrier()
    return target


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Resume from a checkpoint written with any number of processes (every rank reads it)."""
    if is_sharded(model):
        return load_checkpoint_files(path, _FullStateModel(model), _FullStateOptimizer(optimizer), scheduler)
    return load_checkpoint_files(path, model, optimizer, scheduler)
