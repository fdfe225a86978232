"""Multiple-choice scoring: cached-context log-likelihoods equal a naive full forward per choice."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmos_cli.core.eval.multiple_choice import (
    choice_loglikelihoods,
    encode_pair,
    load_choice_items,
    score_choices,
)
from llmos_cli.errors import UserError

CORPUS = [
    "the sky is blue and the grass is green",
    "question: what colour is the sky? answer: blue",
    "question: what colour is grass? answer: green",
    "roses are red, violets are blue, sugar is sweet",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def naive_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """The reference: one full forward over context + continuation per choice."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), dim=-1)[0]
    targets = ids[0, len(context_ids) :]
    return logprobs[-len(continuation_ids) :].gather(1, targets.unsqueeze(1)).sum().item()


ITEMS = [
    {"context": "question: what colour is the sky? answer:", "choices": ["blue", "green", "red", "sweet violets are"], "answer": 0},
    {"context": "roses are ", "choices": ["red", "blue, sugar is sweet", "green"], "answer": 0},
    {"context": "", "choices": ["the sky", "grass"], "answer": 0},
    {"context": "the grass is", "choices": ["green", "blue", "the sky is blue and the grass is green", "x", "y"], "answer": 0},
]  # fmt: skip


def test_encode_pair_moves_trailing_space_and_splits_after_context_tokens(tokenizer):
    context_ids, cont_ids = encode_pair(tokenizer, "roses are ", "red")
    assert context_ids == tokenizer("roses are", add_special_tokens=False)["input_ids"]
    whole = tokenizer("roses are red", add_special_tokens=False)["input_ids"]
    assert context_ids + cont_ids == whole
    assert tokenizer.decode(cont_ids) == " red"
    assert encode_pair(tokenizer, "", "grass") == (
        [tokenizer.bos_token_id],
        tokenizer("grass", add_special_tokens=False)["input_ids"],
    )


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_cached_context_scores_equal_naive_full_forward(tokenizer, batch_size):
    model = tiny_llama(len(tokenizer))
    lengths = set()
    for item in ITEMS:
        pairs = [encode_pair(tokenizer, item["context"], " " + c) for c in item["choices"]]
        lengths |= {len(cont) for _, cont in pairs}
        got = choice_loglikelihoods(model, pairs[0][0], [cont for _, cont in pairs], batch_size=batch_size)
        want = [naive_loglikelihood(model, ctx, cont) for ctx, cont in pairs]
        assert got == pytest.approx(want, rel=1e-5)
    assert 1 in lengths and max(lengths) > 3  # one-token choices skip the choice forward; long ones do not


def test_score_choices_metrics_follow_the_loglikelihoods(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    result = score_choices(model, tokenizer, ITEMS, batch_size=3)
    assert result["metrics"]["n_examples"] == len(ITEMS)
    hits = hits_norm = 0
    for item, pred in zip(ITEMS, result["predictions"], strict=True):
        lls = pred["loglikelihoods"]
        normed = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        assert pred["prediction"] == lls.index(max(lls))
        assert pred["prediction_norm"] == normed.index(max(normed))
        hits += pred["prediction"] == item["answer"]
        hits_norm += pred["prediction_norm"] == item["answer"]
    assert result["metrics"]["accuracy"] == hits / len(ITEMS)
    assert result["metrics"]["accuracy_norm"] == hits_norm / len(ITEMS)


STEPS = 40


def test_trained_model_picks_the_obvious_answer(tokenizer):
    model = tiny_llama(len(tokenizer), seed=2).train()
    rows = tokenizer(CORPUS[:4], add_special_tokens=False)["input_ids"]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        model(input_ids=ids, labels=labels).loss.backward()  # right padding: causal, labels ignore it
        optimizer.step()
        optimizer.zero_grad()
    items = [
        {
            "context": "question: what colour is the sky? answer:",
            "choices": ["green", "blue", "red"],
            "answer": 1,
        },
        {
            "context": "question: what colour is grass? answer:",
            "choices": ["green", "blue", "red"],
            "answer": 0,
        },
        {"context": "roses are", "choices": ["blue", "green", "red"], "answer": 2},
    ]
    result = score_choices(model, tokenizer, items)
    assert result["metrics"]["accuracy"] == 1.0
    assert model.training  # restored


def test_long_context_is_cut_from_the_left_like_the_harness(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    context_ids, cont_ids = encode_pair(tokenizer, " ".join(CORPUS[:3]), " blue")
    assert len(context_ids) > 16
    (got,) = choice_loglikelihoods(model, context_ids, [cont_ids])
    kept = context_ids[-(16 - len(cont_ids) + 1) :]
    assert got == pytest.approx(naive_loglikelihood(model, kept, cont_ids), rel=1e-5)


def test_load_choice_items_accepts_question_or_context_and_answer_text(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"question": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"context": "sky:", "choices": ["blue", "red"], "answer": "red"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_choice_items(path) == [
        {"context": "2+2=", "choices": ["3", "4"], "answer": 1},
        {"context": "sky:", "choices": ["blue", "red"], "answer": 1},
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"choices": ["a", "b"], "answer": 0}', "'question'"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
        ('{"question": "q", "choices": ["a", ""], "answer": 0}', "non-empty"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "0..1"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "'c' is not one of the choices"),
        ('["q", ["a", "b"], 0]', "JSON object"),
    ],
)
def test_load_choice_items_names_file_and_line_of_a_bad_row(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as err:
        load_choice_items(path)
    assert f"{path}:2:" in str(err.value)


def test_load_choice_items_missing_or_empty_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_choice_items(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no items"):
        load_choice_items(tmp_path / "empty.jsonl")


def test_choices_written_with_their_leading_space_are_not_given_a_second(tmp_path, tokenizer):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        json.dumps({"question": "the sky is", "choices": [" blue", " green"], "answer": 0}) + "\n"
    )
    with pytest.raises(UserError, match=r"choice ' blue' starts with whitespace") as err:
        load_choice_items(path)  # the harness's default target_delimiter " " would make it "  blue"
    assert f"{path}:1:" in str(err.value) and "eval.target_delimiter=''" in err.value.hint
    spaced = load_choice_items(path, target_delimiter="")
    model = tiny_llama(len(tokenizer), seed=3)
    own = score_choices(model, tokenizer, spaced, target_delimiter="")
    plain = [{**spaced[0], "choices": ["blue", "green"]}]
    default = score_choices(model, tokenizer, plain)  # target_delimiter " ", as lm-evaluation-harness
    assert own["predictions"][0]["loglikelihoods"] == default["predictions"][0]["loglikelihoods"]
    _, continuation = encode_pair(tokenizer, "the sky is", " blue")
    assert tokenizer.decode(continuation) == " blue"  # one space, as the harness scores it
