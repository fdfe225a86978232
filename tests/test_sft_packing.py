"""Packed chat and instruction examples (data.packing: true): whole examples per row, each attending
to itself alone, the same loss as one example a row, and a fine-tune that learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmos_cli.core.data.pack import pack_examples
from llmos_cli.core.train.batches import causal_lm_collate
from llmos_cli.core.train.objectives import causal_lm_loss_sum
from llmos_cli.errors import UserError
from llmos_cli.recipe import validate_recipe
from llmos_cli.stages import finetune
from tests.finetune_fixtures import chat_rows, instruction_rows, tiny_llama
from tests.test_finetune import recipe_for, train_losses


def _examples(lengths: list[int]) -> dict[str, list]:
    ids = [[100 * n + j for j in range(n)] for n in lengths]
    return {"input_ids": ids, "labels": [[-100] + x[1:] for x in ids]}


def test_examples_pack_whole_best_fit_decreasing_with_restarting_positions() -> None:
    columns = _examples([5, 3, 7, 2, 6, 1, 8])
    packed, stats = pack_examples(columns, block_size=8)
    # best fit, longest first: [8], [7, 1], [6, 2], [5, 3]
    assert [[len(set(x // 100 for x in row))] for row in packed["input_ids"]] == [[1], [2], [2], [2]]
    assert sorted(len(r) for r in packed["input_ids"]) == [8, 8, 8, 8]
    assert stats == {"packing": "reset_positions", "blocks": 4, "block_size": 8, "fill": 1.0}
    unpacked = []
    for ids, labels, pos in zip(packed["input_ids"], packed["labels"], packed["position_ids"], strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            assert pos[a:b] == list(range(b - a))
            unpacked.append((ids[a:b], labels[a:b]))
    assert sorted(unpacked) == sorted(zip(columns["input_ids"], columns["labels"], strict=True))


def test_a_packed_row_has_the_loss_of_its_examples_one_a_row(tmp_path: Path) -> None:
    """The model-side contract: restarting positions, no attention mask, no cache -> every example
    attends to itself alone, so the summed loss (and its gradient) is that of the separate rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama(tmp_path / "llama"))).eval()
    torch.manual_seed(0)
    lengths = [9, 5, 12]
    ids = [torch.randint(2, 60, (n,)).tolist() for n in lengths]
    columns = {"input_ids": ids, "labels": [[-100] * 3 + x[3:] for x in ids]}
    packed, _ = pack_examples(columns, block_size=32)
    assert len(packed["input_ids"]) == 1
    collate = causal_lm_collate(pad_id=0)
    rows = [dict(zip(packed, r, strict=True)) for r in zip(*packed.values(), strict=True)]
    together = causal_lm_loss_sum(model, collate(rows))
    apart = sum(
        causal_lm_loss_sum(model, collate([{"input_ids": i, "labels": lab}]))
        for i, lab in zip(columns["input_ids"], columns["labels"], strict=True)
    )
    torch.testing.assert_close(together, apart, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["chat", "instruction"])
def test_packed_fine_tune_learns_and_reports_its_blocks(fmt: str, tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "llama")
    rows, data = chat_rows(200), {"format": "chat"}
    if fmt == "instruction":
        rows, data = instruction_rows(200), {"format": "instruction", "template": "Q: {prompt}\nA: "}
    recipe = recipe_for(
        tmp_path,
        base,
        rows,
        data={**data, "max_seq_len": 256, "packing": True},
        train={"max_steps": 30, "eval_every": 30, "lr": 3e-3},
    )
    finetune.run(recipe)
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    train = report["train"]
    assert train["packing"]["packing"] == "reset_positions"
    assert train["packing"]["blocks"] < train["examples"] / 2 and train["packing"]["fill"] > 0.6
    assert "packing" not in report["validation"]  # validation stays one example a row
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    assert max(r["padding"] for r in train_rows) < 0.2  # blocks are nearly full: little padding


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bloom"])
def test_packed_rows_are_refused_for_a_model_that_attends_across_documents(arch: str) -> None:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmos_cli.core.train.batches import check_packed_rows

    packed = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "position_ids": [[0, 1, 0, 1]]})

    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64}
    if arch in ("llama", "qwen2"):
        sizes.update(num_key_value_heads=4, intermediate_size=64)
    if arch == "gpt2":
        sizes = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes)).train()
    if arch == "bloom":  # ALiBi, no position ids: its mask cannot tell the documents apart
        with pytest.raises(UserError, match="data.packing: this bloom model attends across packed documents"):
            check_packed_rows(model, packed, "data.packing")
    else:
        check_packed_rows(model, packed, "data.packing")
    assert model.training  # the check leaves the model as it found it


def test_packing_is_refused_for_formats_of_single_examples(tmp_path: Path) -> None:
    body = {
        "run": {"name": "x"},
        "task": "classification",
        "data": {"train": "t.jsonl", "format": "classification", "packing": True},
    }
    with pytest.raises(UserError, match="data.packing: 'classification' rows are one example each"):
        validate_recipe(body, str(tmp_path / "recipe.yaml"))


def test_auto_packs_text_only() -> None:
    text = validate_recipe({"run": {"name": "x"}}, "r.yaml")
    chat = validate_recipe({"run": {"name": "x"}, "data": {"format": "chat"}}, "r.yaml")
    assert text.data.packing == "auto" and text.data.packs and not chat.data.packs
