"""The one training loop that pretrain and finetune share.

Everything that differs between jobs (model, objective, collator, trainable parameters) is decided
before `train` is called. The loop itself reads top to bottom: batch, forward, backward, clip,
step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from llmos_cli.console import out
from llmos_cli.core import distributed
from llmos_cli.core.eval.loss import dataset_sums, loss_metrics
from llmos_cli.core.rundir import RunDir
from llmos_cli.core.runtime import LossScaling, Precision
from llmos_cli.core.train import full_state
from llmos_cli.core.train.batches import Collate, ResumableBatchSampler, to_device
from llmos_cli.core.train.checkpoint import latest_checkpoint
from llmos_cli.core.train.early_stopping import MetricWatch, load_trained_weights, save_trained_weights
from llmos_cli.core.train.log_window import LogWindow
from llmos_cli.core.train.memory import note_workload
from llmos_cli.core.train.objectives import Objective, summed
from llmos_cli.core.train.resume import last_logged, resume, training_settings
from llmos_cli.core.train.signals import StopRequest
from llmos_cli.core.train.tracking import open_trackers
from llmos_cli.errors import RunFailed, UserError
from llmos_cli.recipe import TrainSection


@dataclass
class TrainJob:
    model: torch.nn.Module
    train_rows: Any  # indexable rows (a HF Dataset or a list of dicts)
    val_rows: Any | None
    objective: Objective
    collate: Collate
    cfg: TrainSection
    run: RunDir
    seed: int
    device: torch.device
    precision: Precision
    compat: dict[str, Any] = field(default_factory=dict)  # what must match for a resume
    group_by_length: bool = False  # for rows that are not packed: batches of similar length, less padding
    metrics: Callable[[Any], dict[str, float]] | None = None  # validation metrics beyond the loss


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float | None
    validation: dict[str, float] | None
    resumed_from: str | None
    best: dict[str, Any] | None = None  # the watched metric's best value and step
    stopped_early: bool = False


class NonFiniteGuard:
    """Remembers, on the device, the first step whose gradient norm was not finite.

    Checking the norm on the host every step would stall a GPU's queue; the loop asks `first_bad`
    only where it syncs anyway (logging, evaluation, saving), before any of them can use the weights.
    """

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self.norm = torch.zeros((), device=device)

    def record(self, step: int, grad_norm: torch.Tensor) -> None:
        first = ~torch.isfinite(grad_norm) & (self.step == 0)
        self.step = torch.where(first, step, self.step)
        self.norm = torch.where(first, grad_norm.float(), self.norm)

    def first_bad(self) -> tuple[int, float] | None:
        step = int(self.step)
        return (step, float(self.norm)) if step else None


def total_steps(cfg: TrainSection, n_rows: int) -> int:
    if cfg.max_steps is not None and cfg.epochs is None:
        return cfg.max_steps
    batches_per_epoch = n_rows // cfg.batch_size
    steps = math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def build_optimizer(model: torch.nn.Module, cfg: TrainSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms; fused kernels on GPU and CPU (7x foreach on CPU)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSection, steps: int) -> Any:
    from transformers import get_scheduler

    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def train(job: TrainJob) -> TrainResult:
    cfg, model, device, run = job.cfg, job.model, job.device, job.run
    steps = total_steps(cfg, len(job.train_rows))
    if len(job.train_rows) < cfg.batch_size:
        raise UserError(
            f"train.batch_size: {cfg.batch_size} is larger than the training set ({len(job.train_rows)} rows)"
        )
    world = distributed.current_world()  # one process unless launched by torchrun
    note_workload(  # for the out-of-memory message, should a step not fit
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seq_len=max(len(job.train_rows[i]["input_ids"]) for i in range(min(len(job.train_rows), 64))),
        parameters=sum(p.numel() for p in model.parameters()),
        checkpoints=str(run.checkpoints),
    )
    model.to(device)
    # DDP wraps the model; FSDP shards it in place. `model` stays the module whose state we save.
    wrapped = distributed.wrap_model(model, cfg.distributed, job.precision, device)
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    scaling = job.precision.loss_scaling(device)
    watch = MetricWatch.from_config(cfg)  # early stopping and the best weights
    if watch.asked and job.val_rows is None:
        raise UserError(
            "train.early_stopping / train.keep_best need validation data (data.validation or split)"
        )
    state = {"step": 0, "micro_batches": 0, "tokens": 0}
    start = resume(cfg, run, job.compat, (model, optimizer, scheduler), state, watch, steps, world)
    last_loss, validation = start.last_loss, start.validation
    batches, micro_per_step = _batches(job, state["micro_batches"], world)
    window, nonfinite = LogWindow(device), NonFiniteGuard(device)
    model.train()

    with (
        StopRequest() as stop,
        out.progress("train", total=steps) as bar,
        open_trackers(cfg.log_to, run, cfg.model_dump(mode="json")) as trackers,
    ):
        bar.update(state["step"])
        while state["step"] < steps and not watch.should_stop:
            # One optimizer step over grad_accum micro-batches, weighting every target equally.
            micro = [next(batches) for _ in range(micro_per_step)]
            n_targets = world.sum(sum(job.objective.count(b) for b in micro))  # over all ranks
            for i, batch in enumerate(micro):
                with distributed.gradient_sync(wrapped, sync=i == len(micro) - 1):
                    with job.precision.autocast(device):
                        loss_sum, metric_sums = summed(
                            job.objective.loss_sum(forward_model, to_device(batch, device))
                        )
                    # DDP and FSDP average gradients over ranks; scaling by the world size makes that a sum.
                    scaling.backward(loss_sum * world.size / max(n_targets, 1))
                window.add_batch(batch, loss_sum, metric_sums)
            window.targets += n_targets
            grad_norm = _optimizer_step(model, optimizer, scheduler, scaling, cfg.max_grad_norm)
            if not scaling.skips_nonfinite_steps:
                nonfinite.record(state["step"] + 1, grad_norm)
            state["step"] += 1
            state["micro_batches"] += cfg.grad_accum
            step = state["step"]
            stopping = distributed.agree_on_stop(stop, world)  # the same on every rank
            log_step = step % cfg.log_every == 0 or step == steps
            evaluating = job.val_rows is not None and (step % cfg.eval_every == 0 or step == steps)
            saving = step % cfg.save_every == 0 or step == steps or stopping
            if log_step or evaluating or saving:  # before anything reads or keeps the weights
                _check_gradients(job, nonfinite)
            if log_step:
                last_loss = _log_step(job, window, state, scheduler, grad_norm, world, trackers, bar)
            if evaluating:
                validation = _evaluate(job, model, world, trackers, bar, window, watch, step)
            if saving or watch.should_stop:  # an early stop follows an evaluation, checked above
                saved = _save_checkpoint(job, world, model, optimizer, scheduler, state, watch)
            bar.update(1)
            if stopping and step < steps:
                raise RunFailed(
                    f"stopped by {stop.name} at step {step}; checkpoint saved to {saved}; "
                    "run the same command again to resume",
                    exit_code=128 + stop.signum,
                )

    if _restore_best(job, model, watch, state["step"], world):
        # the result describes the weights kept: the losses logged at the best step, not the last one
        last_loss, validation = world.broadcast(last_logged(run, up_to=watch.best_step))
    resumed_from = str(start.path) if start.path else None
    return TrainResult(
        state["step"],
        state["tokens"],
        last_loss,
        validation,
        resumed_from,
        best=watch.result,
        stopped_early=watch.should_stop,
    )


def _batches(job: TrainJob, micro_batches_done: int, world: distributed.World) -> tuple[Any, int]:
    """The training batches from where the run stands, and how many micro-batches make one step.
    Each rank trains on its slice of every global step: any process count sees the same batches."""
    cfg = job.cfg
    lengths = [len(r["input_ids"]) for r in job.train_rows] if job.group_by_length else None
    sampler = distributed.ShardedBatchSampler(
        ResumableBatchSampler(
            len(job.train_rows), cfg.batch_size, job.seed, micro_batches_done, lengths=lengths
        ),
        cfg.grad_accum,
        world,
    )
    loader = DataLoader(
        job.train_rows,
        batch_sampler=sampler,
        collate_fn=job.collate,
        num_workers=cfg.num_workers,
        pin_memory=job.device.type == "cuda",
    )
    return iter(loader), sampler.micro_per_step


def _optimizer_step(
    model: torch.nn.Module, optimizer: Any, scheduler: Any, scaling: LossScaling, max_grad_norm: float | None
) -> torch.Tensor:
    """Clip, step, schedule, zero; returns the gradient norm before clipping (on the device)."""
    scaling.unscale(optimizer)
    grad_norm = distributed.clip_grad_norm(model, max_grad_norm or float("inf"))
    scaling.step(optimizer)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _log_step(
    job: TrainJob,
    window: LogWindow,
    state: dict[str, int],
    scheduler: Any,
    grad_norm: torch.Tensor,
    world: distributed.World,
    trackers: Any,
    bar: Any,
) -> float:
    """Write one training row of metrics.jsonl (and the trackers); returns the window's mean loss."""
    metrics = window.metric_means(world)  # an objective's own (DPO's rewards), beside the loss
    loss, tokens, seconds = window.close(world)
    if not math.isfinite(loss):
        _diverged(job, state["step"], f"loss is {loss}")
    state["tokens"] += tokens
    row = {
        "step": state["step"],
        "loss": round(loss, 6),
        **{k: round(v, 6) for k, v in metrics.items()},
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": round(float(grad_norm), 4),
        "tokens": state["tokens"],
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "padding": round(window.padding, 4),  # the share of positions computed for pads
    }
    if world.is_main:
        job.run.log(row)
        trackers.log(row)
    bar.update(0, loss=row["loss"], lr=row["lr"], tok_s=row["tokens_per_s"])
    return loss


def _evaluate(
    job: TrainJob,
    model: torch.nn.Module,
    world: distributed.World,
    trackers: Any,
    bar: Any,
    window: LogWindow,
    watch: MetricWatch,
    step: int,
) -> dict[str, float]:
    """Validation loss (and the job's metrics), logged and watched; the best weights kept if asked."""
    began = time.perf_counter()
    total, count, metric_sums = _validation_sums(job, model, world)
    validation = loss_metrics(total, count, job.objective.per_token, metric_sums)
    if job.metrics:
        validation.update(job.metrics(model))
    validation = world.broadcast(validation)  # every rank's watch decides alike
    if world.is_main:
        job.run.log({"step": step, "split": "validation", **validation})
        trackers.log({"step": step, "split": "validation", **validation})
    bar.update(0, val_loss=validation["loss"])
    window.pause(time.perf_counter() - began)  # tokens/s counts training time only
    if watch.update(validation, step) and job.cfg.keep_best:
        save_trained_weights(model, _best_file(job), world)
    if watch.should_stop:
        out.info(
            f"train: early stop at step {step}: {watch.metric} did not improve for "
            f"{watch.patience} evaluations (best {watch.best:.6g} at step {watch.best_step})"
        )
    return validation


def _save_checkpoint(
    job: TrainJob,
    world: distributed.World,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, int],
    watch: MetricWatch,
) -> Path:
    extra = {**state, "compat": job.compat, "settings": training_settings(job.cfg), "watch": watch.state()}
    return full_state.save_checkpoint(
        world, job.run.checkpoints, state["step"], model, optimizer, scheduler, extra, job.cfg.keep_last
    )


def _best_file(job: TrainJob) -> Path:
    return job.run.checkpoints / "best.safetensors"


def _restore_best(job: TrainJob, model: torch.nn.Module, watch: MetricWatch, step: int, world: Any) -> bool:
    """With keep_best, load the best weights when they are not the last step's; True when it did."""
    best_saved = world.broadcast(_best_file(job).exists())  # under FSDP loading is a collective: agree first
    if not (job.cfg.keep_best and watch.best_step not in (None, step) and best_saved):
        return False
    load_trained_weights(model, _best_file(job))
    out.info(f"train: keeping the best weights ({watch.metric} {watch.best:.6g} at step {watch.best_step})")
    return True


def _validation_sums(
    job: TrainJob, model: torch.nn.Module, world: distributed.World
) -> tuple[float, int, dict[str, float]]:
    """Summed validation loss, targets and metrics. Under DDP each rank scores every world.size-th batch
    and the sums are added up; under FSDP every rank runs every batch (its forward is a collective)."""
    split = world.size > 1 and not distributed.is_sharded(model)
    total, count, metrics = dataset_sums(
        model,
        job.val_rows,
        job.objective,
        job.collate,
        batch_size=job.cfg.batch_size,
        device=job.device,
        precision=job.precision,
        max_batches=job.cfg.eval_batches,
        shard=(world.rank, world.size) if split else (0, 1),
    )
    if not split:
        return total, count, metrics
    return world.sum(total), world.sum(count), {k: world.sum(v) for k, v in sorted(metrics.items())}


def _check_gradients(job: TrainJob, guard: NonFiniteGuard) -> None:
    """Stop at the first step whose gradient norm was not finite, if any (reads the guard: a host sync)."""
    if bad := guard.first_bad():
        _diverged(job, bad[0], f"gradient norm is {bad[1]}")


def _diverged(job: TrainJob, step: int, what: str) -> None:
    last_good = latest_checkpoint(job.run.checkpoints)
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
    raise RunFailed(
        f"training diverged at step {step}: {what}; stopped without saving it ({kept}). "
        "Lower train.lr, raise train.warmup, or check the data"
    )
