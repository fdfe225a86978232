"""The inference runner: sampling parameters, a running batch with a shared KV cache, batched and streamed generation.

One `DecodeBatch` holds the sequences being generated: their KV cache (left-padded to a common length), attention
mask and next positions. Sequences join it between decode steps (their prompts are prefilled and the caches merged)
and leave it as soon as they finish, so `generate`, `stream` and the serving engine (core/batching.py) all run the
same continuous-batching step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

FinishReason = str  # "stop" (eos or a stop sequence), "length", "cancelled", "error"

# The ranges sampling accepts (the server's schema states the same ones). Penalties and logit bias are OpenAI's.
REPETITION_PENALTY_RANGE = (0.01, 10.0)
PENALTY_RANGE = (-2.0, 2.0)  # frequency_penalty, presence_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MIN_TEMPERATURE = 1e-3  # a smaller positive temperature samples like this one (the logits would overflow)
SEED_MODULUS = 1 << 64  # torch generators take 64-bit seeds


class SequenceError(RuntimeError):
    """Generating one sequence failed (unusable logits, sampling, decoding its text); the others go on."""


class PrefillError(RuntimeError):
    """The model failed on prompts joining the batch; the sequences already running are untouched."""


def _in(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.

    frequency_penalty and presence_penalty (OpenAI's) lower the logits of tokens already generated, by their
    count and once; logit_bias adds (token id, bias) pairs to the logits before anything else.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range parameter."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name, bounds in (
            ("repetition_penalty", REPETITION_PENALTY_RANGE),
            ("frequency_penalty", PENALTY_RANGE),
            ("presence_penalty", PENALTY_RANGE),
        ):
            if not _in(getattr(self, name), bounds):
                raise ValueError(f"{name} must be in [{bounds[0]}, {bounds[1]}], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not _in(bias, LOGIT_BIAS_RANGE):
                raise ValueError(
                    f"logit_bias maps token ids >= 0 to a bias in [{LOGIT_BIAS_RANGE[0]}, "
                    f"{LOGIT_BIAS_RANGE[1]}], got {token}: {bias}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before the pick."""
        return bool(
            self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.logit_bias
        )

    def for_row(self, row: int) -> SamplingParams:
        """The parameters of the `row`-th prompt of a request: seeded rows differ, and each reproduces."""
        return self if self.seed is None or row == 0 else replace(self, seed=self.seed + row)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason


@dataclass
class GenSequence:
    """One prompt being generated: its tokens, sampling state and the text released so far."""

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Any
    eos_ids: frozenset[int]
    on_delta: Callable[[str], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None
    error: SequenceError | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % SEED_MODULUS)
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> None:
        """Append a generated token; release new text and detect eos, stop sequences and the length limit."""
        self.output_ids.append(token)
        if token in self.eos_ids:
            self._finish("stop", len(self.text))
            return
        text = self.tokenizer.decode(self.output_ids, skip_special_tokens=True)
        self.text = text
        if self.params.stop:
            start = max(0, self.emitted - self._hold)
            hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self._finish("stop", min(hits))
                return
        if len(self.output_ids) >= self.params.max_new_tokens:
            self._finish("length", len(text))
            return
        # Hold back what could be the start of a stop sequence, or half of a multi-byte character.
        safe = len(text) - self._hold
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        self._release(safe)

    def cancel(self, reason: FinishReason = "cancelled") -> None:
        if not self.finished:
            self.finish_reason = reason

    def fail(self, error: SequenceError) -> None:
        """Finish this sequence with `error`; what it released so far stays released."""
        if not self.finished:
            self.error, self.finish_reason = error, "error"

    def _finish(self, reason: FinishReason, end: int) -> None:
        self.text = self.text[:end]
        self._release(end)
        self.finish_reason = reason

    def _release(self, end: int) -> None:
        if end > self.emitted:
            if self.on_delta is not None:
                self.on_delta(self.text[self.emitted : end])
            self.emitted = end

    def completion(self) -> Completion:
        return Completion(
            self.text, list(self.output_ids), len(self.prompt_ids), self.finish_reason or "length"
        )


def _unusable(logits: torch.Tensor) -> torch.Tensor:
    """Per row: true where a NaN or +inf is present, or no entry is finite (nothing could be sampled)."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)


def pick_tokens(logits: torch.Tensor, seqs: Sequence[GenSequence]) -> list[int]:
    """Next token per row: logit bias and penalties, then greedy or temperature/top-k/top-p sampling (HF
    semantics). Rows are checked in fp32 first; one that cannot be sampled fails its own sequence
    (`seq.fail`) and gets token 0."""
    logits = logits.float()
    bad = _unusable(logits).tolist()
    chosen = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if bad[i]:
            seq.fail(SequenceError("the model produced non-finite logits"))
            chosen[i] = 0
            continue
        if seq.params.greedy and not seq.params.adjusts_logits:
            continue
        try:
            chosen[i] = _pick(logits[i], seq)
        except Exception as err:  # noqa: BLE001 - one row's sampling failure fails that sequence only
            seq.fail(err if isinstance(err, SequenceError) else SequenceError(f"sampling failed: {err}"))
            chosen[i] = 0
    return chosen


def _pick(row: torch.Tensor, seq: GenSequence) -> int:
    """One row's token, computed on the host in float64 (any finite fp32 logit stays finite under the clamped
    scales, and the CPU generator makes seeds device-independent); the row is checked again before sampling."""
    p = seq.params
    row = row.detach().to("cpu", torch.float64)
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)
        bias = torch.tensor([b for _, b in p.logit_bias], dtype=torch.float64).clamp(*LOGIT_BIAS_RANGE)
        row = row.index_add(0, ids, bias)
    if p.repetition_penalty != 1.0:
        penalty = min(max(p.repetition_penalty, REPETITION_PENALTY_RANGE[0]), REPETITION_PENALTY_RANGE[1])
        seen = torch.tensor(seq.prompt_ids + seq.output_ids, dtype=torch.long)
        score = row.gather(0, seen)
        score = torch.where(score < 0, score * penalty, score / penalty)
        row = row.scatter(0, seen, score)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids), minlength=row.numel()).double()
        row = (
            row
            - counts * min(max(p.frequency_penalty, PENALTY_RANGE[0]), PENALTY_RANGE[1])
            - (counts > 0).double() * min(max(p.presence_penalty, PENALTY_RANGE[0]), PENALTY_RANGE[1])
        )
    if bool(_unusable(row)):
        raise SequenceError("the logits are not finite after the penalties and logit bias")
    if p.greedy:
        return int(row.argmax())
    row = (row - row.max()) / max(p.temperature, MIN_TEMPERATURE)  # the best token's logit is 0: no overflow
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # and the best token always (a top_p below float32's range would drop it too)
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    return int(torch.multinomial(row.softmax(-1), 1, generator=seq.generator))


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """The sequences being generated together and their shared, left-padded KV cache."""

    def __init__(self, model: Any, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.seqs: list[GenSequence] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.seqs)

    @torch.inference_mode()
    def add(self, new: Sequence[GenSequence]) -> None:
        """Prefill `new` prompts together, pick their first tokens, and merge them into the running batch.

        Raises PrefillError, the running batch unchanged, when the model fails on the new prompts."""
        from transformers import DynamicCache

        if not new:
            return
        length = max(len(s.prompt_ids) for s in new)
        ids = torch.tensor([[self.pad_id] * (length - len(s.prompt_ids)) + s.prompt_ids for s in new])
        mask = torch.tensor([[0] * (length - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as err:  # noqa: BLE001 - the caller decides whether the model or these prompts failed
            raise PrefillError(f"{type(err).__name__}: {err}") from err
        self._merge(list(new), cache, mask, out.logits[:, -1])

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every sequence in the batch."""
        if not self.seqs:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        self._accept(self.seqs, out.logits[:, -1])

    def drop_finished(self) -> list[GenSequence]:
        """Remove finished (or cancelled) sequences from the batch and return them."""
        done = [s for s in self.seqs if s.finished]
        if not done:
            return []
        keep = [i for i, s in enumerate(self.seqs) if not s.finished]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.positions, self.last = self.positions[:0], self.last[:0]
            return done
        index = torch.tensor(keep)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        start = int(self.mask.any(dim=0).long().argmax())  # columns left of this are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return done

    def _merge(self, new: list[GenSequence], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        positions = mask.sum(-1)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            self.seqs = []
            self.last = torch.zeros(0, dtype=torch.long)
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for old, add in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(add.keys, length, 2)])
                old.values = torch.cat([_left_pad(old.values, length, 2), _left_pad(add.values, length, 2)])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.positions = torch.cat([self.positions, positions])
        self.seqs = self.seqs + new
        tokens = pick_tokens(logits, new)
        self.last = torch.cat([self.last, torch.tensor(tokens)])
        _accept_each(new, tokens)

    def _accept(self, seqs: list[GenSequence], logits: torch.Tensor) -> None:
        tokens = pick_tokens(logits, seqs)
        self.last = torch.tensor(tokens)
        _accept_each(seqs, tokens)


def _accept_each(seqs: Sequence[GenSequence], tokens: list[int]) -> None:
    """Hand each sequence its token; one whose decoding (or delta callback) raises fails alone."""
    for seq, tok in zip(seqs, tokens, strict=True):
        if seq.finished:
            continue
        try:
            seq.accept(tok)
        except Exception as err:  # noqa: BLE001 - isolate the failure to its sequence
            seq.fail(SequenceError(f"decoding the output failed: {type(err).__name__}: {err}"))


def chat_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (e.g. <|im_end|>), if any.

    Found by rendering a one-exchange conversation: what the assistant turn adds after the generation
    prompt is its content and its closing marker.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "x"}]
    try:
        prompt = tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": "y"}], tokenize=True, return_dict=False
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this simply names no end token
        return None
    prompt, full = _token_list(prompt), _token_list(full)
    if full[: len(prompt)] != prompt:
        return None
    # Control tokens: the named special tokens and any added token marked special (e.g. <|im_end|>).
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return next((t for t in full[len(prompt) :] if t in special), None)


def _token_list(ids: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list or, in some versions, a mapping with input_ids."""
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def stop_token_ids(generation_eos: int | list[int] | None, tokenizer: Any) -> frozenset[int]:
    """What generation stops on: the model's EOS (else the tokenizer's) and the chat end-of-turn token,
    so a chat model trained to close its turn with <|im_end|> stops there."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    end_of_turn = chat_end_of_turn(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return frozenset(ids)


class Runner:
    """A loaded causal LM and its tokenizer, ready to generate."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = stop_token_ids(eos, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        text_config = model.config.get_text_config()
        window = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        sliding = getattr(text_config, "sliding_window", None)
        if isinstance(sliding, int) and sliding > 1:
            # DecodeBatch re-pads caches by hand; a sliding-window layer that started dropping keys would misalign.
            window = min(window or sliding - 1, sliding - 1)
        self.context_window = window

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Runner:
        from transformers import AutoConfig

        from llmos_cli.core.models import load_model, load_tokenizer, resolve_model_dir
        from llmos_cli.errors import UserError

        model_dir = resolve_model_dir(path)
        if (model_dir / "config.json").exists() and getattr(
            AutoConfig.from_pretrained(str(model_dir)), "is_encoder_decoder", False
        ):
            raise UserError(
                f"{model_dir} is an encoder-decoder (seq2seq) model; this runner generates with decoders"
            )
        return cls(load_model(model_dir, "causal-lm", **kwargs), load_tokenizer(model_dir))

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return _token_list(ids)

    def sequence(
        self, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[str], None] | None = None
    ) -> GenSequence:
        """A sequence to generate; an empty prompt starts from BOS (else the pad token): nothing to prefill
        would fail the whole batch."""
        bos = self.tokenizer.bos_token_id
        ids = list(prompt_ids) or [bos if bos is not None else self.pad_id]
        return GenSequence(ids, params, self.tokenizer, self.eos_ids, on_delta)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        *,
        batch_size: int = 16,
        on_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Complete every prompt, `batch_size` at a time; a finished sequence's slot goes to the next prompt.
        A seed seeds each row apart (`SamplingParams.for_row`)."""
        params.check()
        seqs = [
            self.sequence(p if isinstance(p, list) else self.encode(p), params.for_row(i))
            for i, p in enumerate(prompts)
        ]
        index = {id(s): i for i, s in enumerate(seqs)}
        pending = list(reversed(seqs))
        batch = DecodeBatch(self.model, self.pad_id)
        while pending or batch.seqs:
            free = batch_size - len(batch)
            if free > 0 and pending:
                batch.add([pending.pop() for _ in range(min(free, len(pending)))])
            else:
                batch.step()
            for seq in batch.drop_finished():
                if on_done is not None:
                    on_done(index[id(seq)], seq.completion())
        return [s.completion() for s in seqs]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the completion's text as it is generated."""
        params.check()
        pieces: list[str] = []
        seq = self.sequence(
            prompt if isinstance(prompt, list) else self.encode(prompt), params, pieces.append
        )
        batch = DecodeBatch(self.model, self.pad_id)
        batch.add([seq])
        while True:
            yield from pieces
            pieces.clear()
            if seq.finished:
                return
            batch.step()


class EncoderRunner:
    """An encoder (embeddings) or sequence classifier (labels and scores) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 512):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.is_classifier = type(model).__name__.endswith("ForSequenceClassification")

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> EncoderRunner:
        from llmos_cli.core.models import load_model, load_tokenizer, resolve_model_dir

        return cls(load_model(path, **kwargs), load_tokenizer(resolve_model_dir(path)))

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def count_tokens(self, texts: list[str]) -> int:
        return sum(
            len(ids)
            for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        )

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states."""
        enc = self._batch(texts)
        out = self.model(**enc, output_hidden_states=True)
        hidden = (
            out.last_hidden_state
            if getattr(out, "last_hidden_state", None) is not None
            else out.hidden_states[-1]
        )
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).tolist()

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """Label -> probability for each text, from the classification head."""
        probs = self.model(**self._batch(texts)).logits.float().softmax(-1)
        labels = self.model.config.id2label
        return [{str(labels.get(j, j)): float(p) for j, p in enumerate(row)} for row in probs.tolist()]
