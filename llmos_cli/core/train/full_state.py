"""Full (unsharded) states of a model that FSDP may shard: gathered for saving, scattered back
when loading, so checkpoints and weight files are the same on any number of processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmos_cli.core.distributed import World, current_world, is_sharded
from llmos_cli.core.train.checkpoint import load_checkpoint as load_checkpoint_files
from llmos_cli.core.train.checkpoint import save_checkpoint as save_checkpoint_files


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
