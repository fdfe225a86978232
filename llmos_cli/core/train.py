"""The one training loop that pretrain and finetune share.

Everything that differs between jobs (model, objective, collator, trainable parameters) is decided
before `train` is called. The loop itself reads top to bottom: batch, forward, backward, clip,
step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from llmos_cli.console import out
from llmos_cli.core import distributed, full_state
from llmos_cli.core.batches import Collate, ResumableBatchSampler, to_device
from llmos_cli.core.checkpoint import check_compatible, latest_checkpoint
from llmos_cli.core.evaluate import dataset_loss, loss_metrics
from llmos_cli.core.objectives import Objective
from llmos_cli.core.rundir import RunDir, write_atomic
from llmos_cli.core.runtime import Precision
from llmos_cli.core.signals import StopRequest
from llmos_cli.core.tracking import open_trackers
from llmos_cli.core.watch import MetricWatch, load_trained_weights, save_trained_weights
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


def _resume_point(job: TrainJob) -> Path | None:
    mode = job.cfg.resume
    if mode == "never":
        return None
    if mode == "auto":
        return latest_checkpoint(job.run.checkpoints)
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"train.resume: checkpoint not found: {path}")
    return path


def train(job: TrainJob) -> TrainResult:
    cfg, model, device, run = job.cfg, job.model, job.device, job.run
    steps = total_steps(cfg, len(job.train_rows))
    if len(job.train_rows) < cfg.batch_size:
        raise UserError(
            f"train.batch_size: {cfg.batch_size} is larger than the training set ({len(job.train_rows)} rows)"
        )
    world = distributed.current_world()  # one process unless launched by torchrun
    model.to(device)
    # DDP wraps the model; FSDP shards it in place. `model` stays the module whose state we save.
    wrapped = distributed.wrap_model(model, cfg.distributed, job.precision, device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(device.type) if job.precision.needs_scaler else None
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    watch = MetricWatch.from_config(cfg)  # early stopping and/or keeping the best weights
    if watch and job.val_rows is None:
        raise UserError(
            "train.early_stopping / train.keep_best need validation data (data.validation or split)"
        )
    best_file = run.checkpoints / "best.safetensors"

    state = {"step": 0, "micro_batches": 0, "tokens": 0}
    last_loss, validation = None, None
    resumed_from = world.broadcast(_resume_point(job))
    if resumed_from is not None:
        saved = full_state.load_checkpoint(resumed_from, model, optimizer, scheduler)
        check_compatible(saved.get("compat", {}), job.compat, resumed_from)
        state.update({k: saved[k] for k in state})
        if watch:
            watch.restore(saved.get("watch"))
        if world.is_main:
            _truncate_metrics(run, state["step"])
        if state["step"] >= steps or (watch and watch.should_stop):
            _refuse_changed_finished_run(saved.get("settings"), _settings(cfg), resumed_from, state["step"])
            last_loss, validation = _last_logged(run)
            out.info(
                f"train: {run.path} already finished at step {state['step']}: nothing to train "
                "(raise train.max_steps to train on)"
            )
        else:
            out.info(f"train: resumed from {resumed_from} at step {state['step']}")

    # Each rank trains on its slice of every global step: any process count sees the same batches.
    lengths = [len(r["input_ids"]) for r in job.train_rows] if job.group_by_length else None
    sampler = distributed.ShardedBatchSampler(
        ResumableBatchSampler(
            len(job.train_rows), cfg.batch_size, job.seed, state["micro_batches"], lengths=lengths
        ),
        cfg.grad_accum,
        world,
    )
    loader = DataLoader(
        job.train_rows,
        batch_sampler=sampler,
        collate_fn=job.collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    model.train()
    window_loss = torch.zeros((), device=device)
    window_targets, window_tokens, window_start = 0, 0, time.perf_counter()
    nonfinite = NonFiniteGuard(device)

    with (
        StopRequest() as stop,
        out.progress("train", total=steps) as bar,
        open_trackers(cfg.log_to, run, cfg.model_dump(mode="json")) as trackers,
    ):
        bar.update(state["step"])
        while state["step"] < steps and not (watch and watch.should_stop):
            # One optimizer step over grad_accum micro-batches, weighting every target equally.
            micro = [next(batches) for _ in range(sampler.micro_per_step)]
            n_targets = world.sum(sum(job.objective.count(b) for b in micro))  # over all ranks
            for i, batch in enumerate(micro):
                window_tokens += (
                    int(batch["attention_mask"].sum())
                    if "attention_mask" in batch
                    else batch["input_ids"].numel()
                )
                with distributed.gradient_sync(wrapped, sync=i == len(micro) - 1):
                    with job.precision.autocast(device):
                        loss_sum = job.objective.loss_sum(forward_model, to_device(batch, device))
                    # DDP and FSDP average gradients over ranks; scaling by the world size makes that a sum.
                    loss = loss_sum * world.size / max(n_targets, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                window_loss += loss_sum.detach()
            window_targets += n_targets
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = distributed.clip_grad_norm(model, cfg.max_grad_norm or float("inf"))
            if scaler is None:  # fp16's scaler skips non-finite steps itself
                nonfinite.record(state["step"] + 1, grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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
                window_loss, window_tokens = world.sum(window_loss), world.sum(window_tokens)
                elapsed = time.perf_counter() - window_start
                last_loss = float(window_loss) / max(window_targets, 1)
                if not math.isfinite(last_loss):
                    _diverged(job, step, f"loss is {last_loss}")
                state["tokens"] += window_tokens
                row = {
                    "step": step,
                    "loss": round(last_loss, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens": state["tokens"],
                    "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                }
                if world.is_main:
                    run.log(row)
                    trackers.log(row)
                bar.update(0, loss=row["loss"], lr=row["lr"], tok_s=row["tokens_per_s"])
                window_loss.zero_()
                window_targets, window_tokens, window_start = 0, 0, time.perf_counter()

            if evaluating:
                eval_start = time.perf_counter()
                validation = loss_metrics(*_validation_loss(job, model, world), job.objective.per_token)
                if job.metrics:
                    validation.update(job.metrics(model))
                validation = world.broadcast(validation)  # every rank's watch decides alike
                if world.is_main:
                    run.log({"step": step, "split": "validation", **validation})
                    trackers.log({"step": step, "split": "validation", **validation})
                bar.update(0, val_loss=validation["loss"])
                window_start += time.perf_counter() - eval_start  # tokens/s counts training time only
                if watch and watch.update(validation, step) and cfg.keep_best:
                    save_trained_weights(model, best_file, world)
                if watch and watch.should_stop:
                    out.info(
                        f"train: early stop at step {step}: {watch.metric} did not improve for "
                        f"{watch.patience} evaluations (best {watch.best:.6g} at step {watch.best_step})"
                    )

            early_stop = bool(watch and watch.should_stop)
            if saving or early_stop:  # an early stop follows an evaluation, checked above
                saved = full_state.save_checkpoint(
                    world,
                    run.checkpoints,
                    step,
                    model,
                    optimizer,
                    scheduler,
                    {
                        **state,
                        "compat": job.compat,
                        "settings": _settings(cfg),
                        "watch": watch.state() if watch else None,
                    },
                    cfg.keep_last,
                )
            bar.update(1)
            if stopping and step < steps:
                raise RunFailed(
                    f"stopped by {stop.name} at step {step}; checkpoint saved to {saved}; "
                    "run the same command again to resume",
                    exit_code=128 + stop.signum,
                )

    best_saved = world.broadcast(best_file.exists())  # under FSDP loading is a collective: agree first
    if watch and cfg.keep_best and watch.best_step not in (None, state["step"]) and best_saved:
        load_trained_weights(model, best_file)
        # the result describes the weights kept: the losses logged at the best step, not the last one
        last_loss, validation = world.broadcast(_last_logged(run, up_to=watch.best_step))
        out.info(
            f"train: keeping the best weights ({watch.metric} {watch.best:.6g} at step {watch.best_step})"
        )
    return TrainResult(
        state["step"],
        state["tokens"],
        last_loss,
        validation,
        str(resumed_from) if resumed_from else None,
        best={"metric": watch.metric, "value": watch.best, "step": watch.best_step} if watch else None,
        stopped_early=bool(watch and watch.should_stop),
    )


def _validation_loss(job: TrainJob, model: torch.nn.Module, world: distributed.World) -> tuple[float, int]:
    """Summed validation loss and targets. Under DDP each rank scores every world.size-th batch and
    the sums are added up; under FSDP every rank runs every batch (its forward is a collective)."""
    split = world.size > 1 and not distributed.is_sharded(model)
    total, count = dataset_loss(
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
    return (world.sum(total), world.sum(count)) if split else (total, count)


# The settings a finished run was trained with: a rerun that changes one would train nothing with it.
TRAINING_SETTINGS = (
    "lr", "warmup", "scheduler", "weight_decay", "betas", "max_grad_norm", "precision",
    "early_stopping", "keep_best", "class_weights",
)  # fmt: skip


def _settings(cfg: TrainSection) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in TRAINING_SETTINGS}


def _refuse_changed_finished_run(
    saved: dict[str, Any] | None, now: dict[str, Any], path: Path, step: int
) -> None:
    """A finished run resumed with other training settings: say so instead of silently doing nothing."""
    changed = [
        f"train.{k}: {saved[k]!r} -> {now[k]!r}" for k in now if saved and k in saved and saved[k] != now[k]
    ]
    if changed:
        raise UserError(
            f"{path.parent.parent} already finished at step {step} with other settings ({'; '.join(changed)}); "
            "resuming it would train nothing",
            hint="use a new run.output_dir, or --set train.resume=never to train again from scratch",
        )


def _last_logged(run: RunDir, up_to: int | None = None) -> tuple[float | None, dict[str, float] | None]:
    """The last training loss and validation metrics in a run's log (a finished run's result), or the
    last ones logged at or before step `up_to`."""
    rows = [r for r in run.read_metrics() if up_to is None or r.get("step", 0) <= up_to]
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "validation"]
    loss = train_rows[-1]["loss"] if train_rows else None
    validation = (
        {k: v for k, v in val_rows[-1].items() if k not in ("step", "split", "time")} if val_rows else None
    )
    return loss, validation


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


def _truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from, so the log has no repeats."""
    rows = [r for r in run.read_metrics() if r.get("step", 0) <= step]
    write_atomic(run.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
