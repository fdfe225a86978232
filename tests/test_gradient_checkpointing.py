"""finetune.gradient_checkpointing for every task (causal LM, classification, seq2seq) and method (full,
LoRA): activations are recomputed in backward, the loss and gradients are those of a plain step, and
transformers and peft say nothing (no deprecation warnings)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from llmos_cli.core.train.adapters import apply_lora
from llmos_cli.recipe import FinetuneSection
from llmos_cli.stages.finetune import enable_gradient_checkpointing
from tests.finetune_fixtures import tiny_bert, tiny_llama, tiny_t5

CASES = [("llama", "causal-lm"), ("bert", "classification"), ("t5", "seq2seq")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gc")
    return {"llama": tiny_llama(root / "llama"), "bert": tiny_bert(root / "bert"), "t5": tiny_t5(root / "t5")}


def load(path: Path, task: str, method: str, checkpointing: bool):
    from llmos_cli.core.models import describe_model

    torch.manual_seed(0)  # a classifier's new head: the same in both loads
    model = describe_model(path).load(task, **({"num_labels": 2} if task == "classification" else {}))
    for module in model.modules():  # no dropout: a checkpointed step must equal a plain one exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        enable_gradient_checkpointing(model)
    if method == "lora":
        torch.manual_seed(0)
        model = apply_lora(model, FinetuneSection(method="lora", lora={"dropout": 0.0}), task)
    return model.train()


def step(model, task: str) -> tuple[float, dict[str, torch.Tensor]]:
    vocab = min(40, model.config.vocab_size)
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.tensor([0, 1]) if task == "classification" else ids
    if task == "causal-lm":
        batch["use_cache"] = False
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize(("arch", "task"), CASES)
def test_checkpointing_gives_the_plain_steps_gradients_quietly(
    bases, arch: str, task: str, method: str
) -> None:
    plain_loss, plain_grads = step(load(bases[arch], task, method, False), task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation or use_cache warning fails the test
        model = load(bases[arch], task, method, True)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert inner.is_activation_checkpointing
        loss, grads = step(model, task)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
