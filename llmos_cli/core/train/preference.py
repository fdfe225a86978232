"""Preference objectives, DPO and ORPO: one pair is one target, and the loss is summed over pairs.

A batch holds the chosen responses then the rejected ones (2B rows, see `preference_collate`), so
the policy scores both in one forward. DPO compares the policy's log-probabilities with those of a
reference, the starting model: with LoRA the same weights with the adapters disabled (one copy in
memory), with full fine-tuning a frozen copy (`frozen_reference`). ORPO needs no reference.

Besides the loss each objective sums `reward_chosen`, `reward_rejected`, `reward_margin` and
`reward_accuracy` over the pairs; the loop logs their means.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llmos_cli.core.data import IGNORE_INDEX
from llmos_cli.core.train.batches import Collate, pad_rows
from llmos_cli.core.train.objectives import Batch, MetricSums, Objective
from llmos_cli.recipe import FinetuneSection

REWARD_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


def preference_collate(pad_id: int) -> Collate:
    """Pairs -> one causal-LM batch of 2B rows: the B chosen sequences, then the B rejected ones."""

    def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [*(r["input_ids"] for r in rows), *(r["rejected_input_ids"] for r in rows)]
        labels = [*(r["labels"] for r in rows), *(r["rejected_labels"] for r in rows)]
        return {
            "input_ids": pad_rows(ids, pad_id),
            "labels": pad_rows(labels, IGNORE_INDEX),
            "attention_mask": pad_rows([[1] * len(x) for x in ids], 0),
        }

    return collate


def count_pairs(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0]) // 2


def sequence_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its response tokens, and how many there are."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    # labels shift left (not the logits), so no copy of the logits is made
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(
        logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(), reduction="none"
    ).view_as(targets)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def reference_logps(model: Any, reference: torch.nn.Module | None, batch: Batch) -> torch.Tensor:
    """The reference's summed response log-probabilities: `reference`, or with None the policy
    itself with its LoRA adapters disabled (the starting model, without a second copy)."""
    with torch.no_grad(), _adapters_off(model) if reference is None else contextlib.nullcontext():
        return sequence_logps(_unwrapped(model) if reference is None else reference, batch)[0]


def dpo_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    lengths: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss, and the chosen and rejected rewards beta * (log pi - log pi_ref).

    sigmoid (Rafailov et al. 2023; with label smoothing, cDPO): -(1-e) log s(beta d) - e log s(-beta d),
    d the difference of the log-ratios. ipo (Azar et al. 2023): (d' - 1 / (2 beta))^2, d' computed from
    log-ratios per response token, as TRL does.
    """
    ratios = logps - ref_logps
    chosen, rejected = ratios.chunk(2)
    if loss == "ipo":
        n_chosen, n_rejected = lengths.clamp(min=1).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        d = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo_losses(
    logps: torch.Tensor, lengths: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: ORPO's loss (Hong et al. 2024), the chosen response's mean token NLL minus beta times
    log s(log odds(chosen) - log odds(rejected)) on mean token log-probs; rewards beta * mean log-prob."""
    mean = logps / lengths.clamp(min=1)
    chosen, rejected = mean.chunk(2)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def dpo_objective(cfg: FinetuneSection, reference: torch.nn.Module | None) -> Objective:
    """DPO against `reference` (None: the policy with its adapters disabled)."""
    dpo = cfg.dpo

    def loss_sum(model: Any, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        ref = reference_logps(model, reference, batch)
        logps, lengths = sequence_logps(model, batch)
        losses, chosen, rejected = dpo_losses(logps, ref, lengths, dpo.beta, dpo.loss, dpo.label_smoothing)
        return losses.sum(), reward_sums(chosen, rejected)

    return Objective(loss_sum, count_pairs, per_token=False)


def orpo_objective(cfg: FinetuneSection) -> Objective:
    def loss_sum(model: Any, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        logps, lengths = sequence_logps(model, batch)
        losses, chosen, rejected = orpo_losses(logps, lengths, cfg.orpo.beta)
        return losses.sum(), reward_sums(chosen, rejected)

    return Objective(loss_sum, count_pairs, per_token=False)


def preference_objective(cfg: FinetuneSection, reference: torch.nn.Module | None = None) -> Objective:
    """finetune.objective dpo or orpo."""
    return dpo_objective(cfg, reference) if cfg.objective == "dpo" else orpo_objective(cfg)


def frozen_reference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """The DPO reference for a model about to train: None for a LoRA model (its adapters are turned
    off instead), else a frozen copy of the starting weights on `device`."""
    if hasattr(model, "disable_adapter"):
        return None
    reference = copy.deepcopy(model).to(device).eval()
    return reference.requires_grad_(False)


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> MetricSums:
    margin = chosen - rejected
    return {
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
        "reward_margin": margin.sum(),
        "reward_accuracy": (margin > 0).float().sum(),
    }


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 and for large -x."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _unwrapped(model: Any) -> Any:
    """The module under DDP's and torch.compile's wrappers (the peft model, for LoRA)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _adapters_off(model: Any) -> Any:
    inner = _unwrapped(model)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("a DPO reference of None needs a LoRA (peft) model")
    return inner.disable_adapter()
