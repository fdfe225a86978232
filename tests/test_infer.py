"""The inference runner: batched greedy equals per-prompt HF generate, sampling, stop sequences, streaming."""

from __future__ import annotations

import os

import pytest
import torch

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve.runners import GenSequence, Runner, SamplingParams, pick_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "the quick",
    "def fib(n): return",
    "a",
    "language models predict the next token from the",
    "x y z",
    "continuous batching lets short requests",
    "tokenizer",
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner.load(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def hf_generate(runner: Runner, prompt: str, **kwargs) -> list[int]:
    ids = torch.tensor([runner.encode(prompt)])
    out = runner.model.generate(
        ids, attention_mask=torch.ones_like(ids), pad_token_id=runner.pad_id, **kwargs
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def hf_greedy(runner) -> list[list[int]]:
    return [hf_generate(runner, p, max_new_tokens=24, do_sample=False) for p in PROMPTS]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_greedy_equals_per_prompt_hf_generate(runner, hf_greedy, batch_size):
    # batch_size 3 < 7 prompts: sequences join and leave the running batch mid-generation
    results = runner.generate(PROMPTS, SamplingParams(max_new_tokens=24), batch_size=batch_size)
    assert [c.token_ids for c in results] == hf_greedy
    assert [c.prompt_tokens for c in results] == [len(runner.encode(p)) for p in PROMPTS]


def test_repetition_penalty_matches_hf(runner):
    results = runner.generate(
        PROMPTS[:3], SamplingParams(max_new_tokens=16, repetition_penalty=1.5), batch_size=2
    )
    for prompt, c in zip(PROMPTS, results, strict=False):
        assert c.token_ids == hf_generate(
            runner, prompt, max_new_tokens=16, do_sample=False, repetition_penalty=1.5
        )


def test_seeded_sampling_is_reproducible_across_batch_shapes(runner):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = runner.generate(["the quick"], params, batch_size=1)[0]
    batched = runner.generate(["the quick", *PROMPTS], params, batch_size=4)[0]
    assert alone.token_ids == batched.token_ids
    other = runner.generate(["the quick"], SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))[0]
    assert other.token_ids != alone.token_ids


def test_top_k_one_is_greedy(runner):
    sampled = runner.generate(
        PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=0.8, top_k=1, seed=0)
    )
    greedy = runner.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12))
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]


def test_max_new_tokens_and_stop_sequences(runner):
    full = runner.generate(["the quick"], SamplingParams(max_new_tokens=20))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[5:8]
    cut = runner.generate(["the quick"], SamplingParams(max_new_tokens=20, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_stream_concatenates_to_the_completion(runner):
    for params in (SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=20, stop=("e",))):
        pieces = list(runner.stream("the quick", params))
        assert "".join(pieces) == runner.generate(["the quick"], params)[0].text


def test_eos_ends_a_sequence(runner):
    eos = next(iter(runner.eos_ids))
    with torch.no_grad():
        runner.model.lm_head.bias = torch.nn.Parameter(torch.zeros(runner.model.config.vocab_size))
        runner.model.lm_head.bias[eos] = 1e4
    try:
        c = runner.generate(["the quick"], SamplingParams(max_new_tokens=10))[0]
    finally:
        runner.model.lm_head.bias = None
    assert c.finish_reason == "stop" and c.token_ids == [eos] and c.text == ""


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_params_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs).check()


# ---- numerically safe sampling, one sequence's failure, per-row seeds


def one_sequence(runner: Runner, **params) -> GenSequence:
    return runner.sequence(runner.encode("the quick"), SamplingParams(**params))


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0, "repetition_penalty": 5e-324},  # the reproduction from issue 17
        {"temperature": 1.0, "repetition_penalty": 1e300},
        {"temperature": 1e-300, "top_p": 5e-324},
        {"temperature": 2.0, "frequency_penalty": 2.0, "presence_penalty": -2.0, "logit_bias": ((3, 100.0),)},
    ],
)
def test_extreme_parameters_still_sample_a_token(runner, params):
    """The sampler clamps every scale itself, whatever a caller skipping check() hands it."""
    vocab = runner.model.config.vocab_size
    logits = torch.randn(2, vocab) * 30
    seqs = [one_sequence(runner, seed=0, **params) for _ in range(2)]
    logits[1, seqs[1].prompt_ids] = 3e38  # near float32's limit, and penalised
    tokens = pick_tokens(logits, seqs)
    assert all(0 <= t < vocab for t in tokens)
    assert [s.error for s in seqs] == [None, None]


def test_non_finite_logits_fail_only_their_row(runner):
    logits = torch.randn(3, runner.model.config.vocab_size)
    logits[1, 7] = float("nan")
    seqs = [one_sequence(runner) for _ in range(3)]
    tokens = pick_tokens(logits, seqs)
    assert [s.finish_reason for s in seqs] == [None, "error", None]
    assert "non-finite" in str(seqs[1].error)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_a_failing_row_in_a_batch_leaves_the_others_alone(runner, hf_greedy, monkeypatch):
    forward, calls = runner.model.forward, []

    def nan_once(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs["input_ids"].shape[1] == 1:  # decode steps; the third one poisons row 1
            calls.append(1)
            if len(calls) == 3:
                out.logits[1] = float("nan")
        return out

    monkeypatch.setattr(runner.model, "forward", nan_once)
    results = runner.generate(PROMPTS[:3], SamplingParams(max_new_tokens=24), batch_size=3)
    assert [c.finish_reason for c in results] == ["length", "error", "length"]
    assert len(results[1].token_ids) == 3
    assert [results[0].token_ids, results[2].token_ids] == [hf_greedy[0], hf_greedy[2]]


def test_penalties_and_logit_bias_follow_openai(runner):
    vocab = runner.model.config.vocab_size
    logits = torch.zeros(1, vocab)
    logits[0, :3] = torch.tensor([5.0, 4.5, 4.1])
    seq = one_sequence(runner, frequency_penalty=0.3, presence_penalty=0.2)
    seq.output_ids = [
        0,
        0,
        1,
    ]  # token 0: 5 - 2 * 0.3 - 0.2 = 4.2, token 1: 4.5 - 0.3 - 0.2 = 4.0, token 2: 4.1
    assert pick_tokens(logits, [seq]) == [0]
    seq.output_ids = [0, 0, 0, 1]  # token 0: 5 - 3 * 0.3 - 0.2 = 3.9
    assert pick_tokens(logits, [seq]) == [2]
    biased = one_sequence(runner, logit_bias=((9, 6.0),))
    assert pick_tokens(logits, [biased]) == [9]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((9, 101.0),)).check()


def test_each_row_gets_its_own_seed(runner):
    """Issue 18: one seed for several prompts gave identical completions for identical prompts."""
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    first = runner.generate(["the quick", "the quick"], params)
    assert first[0].token_ids != first[1].token_ids
    again = runner.generate(["a", "the quick"], params)
    assert again[1].token_ids == first[1].token_ids  # the same seed and row reproduce
    alone = runner.generate(["the quick"], SamplingParams(max_new_tokens=16, temperature=1.0, seed=4))[0]
    assert alone.token_ids == first[1].token_ids  # row i samples as seed + i


def test_an_empty_prompt_starts_from_the_pad_token(runner):
    c = runner.generate([""], SamplingParams(max_new_tokens=4))[0]
    assert c.prompt_tokens == 1 and len(c.token_ids) == 4
