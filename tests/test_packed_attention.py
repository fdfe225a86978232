"""Packed rows attend within their own document: a packed document's logits equal the document run alone
(SDPA's block-diagonal mask from restarting position ids, on CPU), flattened rows (the varlen flash
attention layout) are padding-free, and the training log reports the padding share."""

from __future__ import annotations

import json

import pytest
import torch

from llmos_cli.core.distributed import current_world
from llmos_cli.core.train.batches import causal_lm_collate, flash_kwargs, flattened_batch, varlen_attention
from llmos_cli.core.train.log_window import LogWindow
from llmos_cli.core.train.objectives import causal_lm_loss_sum
from tests.conftest import TINY_MODEL

PAD = 0


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, **TINY_MODEL)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=request.param).eval()
    return model


def doc(n: int, seed: int) -> list[int]:
    return torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def packed(*docs: list[int]) -> dict:
    return {
        "input_ids": [t for d in docs for t in d],
        "position_ids": [i for d in docs for i in range(len(d))],
    }


def alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def forward(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            use_cache=False,
            **flash_kwargs(batch),
        ).logits


def test_a_packed_documents_logits_equal_the_document_alone(model) -> None:
    d1, d2, d3 = doc(5, 1), doc(7, 2), doc(4, 3)
    batch = causal_lm_collate(PAD)([packed(d1, d2, d3)])
    assert "attention_mask" not in batch and int(batch["padding"]) == 0
    logits = forward(model, batch)[0]
    torch.testing.assert_close(logits[5:12], alone(model, d2), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[12:], alone(model, d3), rtol=0, atol=1e-5)
    # without the restarting positions, document 2 would see document 1: the check can tell
    plain = model(input_ids=batch["input_ids"]).logits[0, 5:12]
    assert (plain - alone(model, d2)).abs().max() > 1e-3


def test_padded_packed_rows_count_their_pads_and_keep_documents_apart(model) -> None:
    d1, d2, d3 = doc(6, 4), doc(6, 5), doc(3, 6)
    batch = causal_lm_collate(PAD)([packed(d1, d2), packed(d3)])
    assert batch["input_ids"].shape == (2, 12) and int(batch["padding"]) == 9
    logits = forward(model, batch)
    torch.testing.assert_close(logits[0, 6:], alone(model, d2), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, :3], alone(model, d3), rtol=0, atol=1e-5)


def test_flattened_rows_are_padding_free_with_varlen_bounds(model) -> None:
    d1, d2, d3 = doc(6, 7), doc(5, 8), doc(3, 9)
    rows = [packed(d1, d2), packed(d3)]
    flat = causal_lm_collate(PAD, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, 14) and int(flat["padding"]) == 0
    assert flat["cu_seq_lens_q"].tolist() == [0, 6, 11, 14] and flat["max_length_q"] == 6
    assert flat["labels"][0, [0, 6, 11]].tolist() == [-100, -100, -100]  # no loss across documents
    logits = forward(model, flat)[0]  # SDPA/eager ignore the varlen arguments and mask from positions
    torch.testing.assert_close(logits[6:11], alone(model, d2), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[11:], alone(model, d3), rtol=0, atol=1e-5)
    # the same loss as the padded layout: pads and document starts carry none in either
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, causal_lm_collate(PAD)(rows))
        flat_loss = causal_lm_loss_sum(model, flattened_batch(rows))
    torch.testing.assert_close(flat_loss, padded, rtol=1e-5, atol=1e-5)
    assert not varlen_attention(model)  # only flash attention takes the flattened layout in training


def test_the_log_window_reports_the_share_of_padding() -> None:
    window = LogWindow(torch.device("cpu"))
    window.add_batch(
        causal_lm_collate(PAD)([packed(doc(6, 1), doc(6, 2)), packed(doc(3, 3))]), torch.tensor(1.0)
    )
    window.add_batch(
        causal_lm_collate(PAD)([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6]}]), torch.tensor(1.0)
    )
    _, tokens, _ = window.close(current_world())
    assert tokens == 15 + 6 and window.padding == pytest.approx(1 - 21 / (24 + 8))


def test_the_training_log_carries_the_padding_share(tiny_recipe, run_cli) -> None:
    assert run_cli("pretrain", tiny_recipe, "--set", "train.max_steps=5").code == 0
    rows = [json.loads(x) for x in (tiny_recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    assert train_rows and all(0.0 <= r["padding"] < 1.0 for r in train_rows)
