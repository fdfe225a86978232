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
from typing import TYPE_CHECKING, Any

import torch

from llmos_cli.core.runtime import model_device
from llmos_cli.core.train.batches import pad_rows

if TYPE_CHECKING:
    from llmos_cli.core.models import ModelInfo

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
    # None: no log-probs; k >= 0: each generated token's log-prob and its k most likely alternatives
    logprobs: int | None = None

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
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
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
        """The parameters of a request's `row`-th sequence (a prompt, or one of its `n` choices): seeded rows
        differ, and each reproduces."""
        return self if self.seed is None or row == 0 else replace(self, seed=self.seed + row)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (the raw log-softmax of its logits, before
    temperature, penalties, bias or filters, as vLLM reports by default), its most likely alternatives
    (token id, log-prob; best first) and where its text starts in the completion."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclass(frozen=True)
class Delta:
    """Newly released text, with the log-probs of the tokens generated since the last delta (when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when SamplingParams.logprobs is set


@dataclass
class GenSequence:
    """One prompt being generated: its tokens, sampling state and the text released so far."""

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Any
    eos_ids: frozenset[int]
    on_delta: Callable[[Delta], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None
    error: SequenceError | None = None

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % SEED_MODULUS)
        self._hold = max((len(s) for s in self.params.stop), default=1) - 1
        self._sent = 0  # log-probs already handed out with a delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, logprob: tuple[float, tuple[tuple[int, float], ...]] | None = None) -> None:
        """Append a generated token (and its log-prob and alternatives); release new text and detect eos,
        stop sequences and the length limit."""
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(TokenLogprob(token, logprob[0], logprob[1], len(self.text)))
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
                self.on_delta(Delta(self.text[self.emitted : end], tuple(self.logprobs[self._sent :])))
            self._sent = len(self.logprobs)
            self.emitted = end

    def completion(self) -> Completion:
        return Completion(
            self.text,
            list(self.output_ids),
            len(self.prompt_ids),
            self.finish_reason or "length",
            list(self.logprobs) if self.params.logprobs is not None else None,
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
        self.device = model_device(model)
        self.seqs: list[GenSequence] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)

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
        ids = torch.tensor(
            [[self.pad_id] * (length - len(s.prompt_ids)) + s.prompt_ids for s in new], device=self.device
        )
        mask = torch.tensor(
            [[0] * (length - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new], device=self.device
        )
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
        index = torch.tensor(keep, device=self.device)
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
            self.last = torch.zeros(0, dtype=torch.long, device=self.device)
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for old, add in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(add.keys, length, 2)])
                old.values = torch.cat([_left_pad(old.values, length, 2), _left_pad(add.values, length, 2)])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.positions = torch.cat([self.positions, positions])
        self.seqs = self.seqs + new
        tokens = pick_tokens(logits, new)
        self.last = torch.cat([self.last, torch.tensor(tokens, device=self.device)])
        _accept_each(new, tokens, logits)

    def _accept(self, seqs: list[GenSequence], logits: torch.Tensor) -> None:
        tokens = pick_tokens(logits, seqs)
        self.last = torch.tensor(tokens, device=self.device)
        _accept_each(seqs, tokens, logits)


LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token the model rules out (JSON has no -inf)


def token_logprobs(
    logits: torch.Tensor, seqs: Sequence[GenSequence], tokens: list[int]
) -> list[tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Per row: the chosen token's raw log-prob (fp32 log-softmax of the logits) and the row's
    `params.logprobs` best alternatives, for the sequences that ask for them (None for the others)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    found: list[tuple[float, tuple[tuple[int, float], ...]] | None] = [None] * len(seqs)
    if not rows:
        return found
    index = torch.tensor(rows, device=logits.device)
    lp = logits.index_select(0, index).float().log_softmax(-1).clamp(min=LOGPROB_FLOOR)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device)).squeeze(1).tolist()
    k = min(max(seqs[i].params.logprobs or 0 for i in rows), lp.shape[-1])
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        n = seqs[i].params.logprobs or 0
        found[i] = (chosen[j], tuple(zip(ids[j][:n], values[j][:n], strict=True)))
    return found


def _accept_each(seqs: Sequence[GenSequence], tokens: list[int], logits: torch.Tensor) -> None:
    """Hand each sequence its token (and log-probs, if asked); one whose decoding (or delta callback)
    raises fails alone."""
    logprobs = token_logprobs(logits, seqs, tokens)
    for seq, tok, lp in zip(seqs, tokens, logprobs, strict=True):
        if seq.finished:
            continue
        try:
            seq.accept(tok, lp)
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
    """A loaded causal LM and its tokenizer, ready to generate with continuous batching."""

    def __init__(self, model: Any, tokenizer: Any):
        from llmos_cli.core.models import context_window

        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = stop_token_ids(eos, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.context_window = context_window(model.config)

    @classmethod
    def load(cls, ref: str | Path, **kwargs: Any) -> Runner:
        """The generation runner for the model `ref` names (a seq2seq model gets a `Seq2SeqRunner`)."""
        return _load_as(cls, ref, kwargs)

    def new_batch(self) -> DecodeBatch:
        """An empty running batch for this model (the serving engine keeps one)."""
        return DecodeBatch(self.model, self.pad_id)

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
        self, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[Delta], None] | None = None
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
        batch = self.new_batch()
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
            prompt if isinstance(prompt, list) else self.encode(prompt),
            params,
            lambda d: pieces.append(d.text),
        )
        batch = self.new_batch()
        batch.add([seq])
        while True:
            yield from pieces
            pieces.clear()
            if seq.finished:
                return
            batch.step()


class Seq2SeqBatch:
    """Encoder-decoder sequences decoded together: a group's prompts are encoded once, then decoded a
    token per step with the decoder's KV cache (finished rows leave it at once).

    Sequences added while a group runs wait and start together when it is done, so the serving engine
    and `Runner.generate` drive it exactly like `DecodeBatch`."""

    def __init__(self, model: Any, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = model_device(model)
        start = model.generation_config.decoder_start_token_id
        self.start_id = start if start is not None else model.config.decoder_start_token_id
        self.group: list[GenSequence] = []
        self.waiting: list[GenSequence] = []
        self.encoded: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.cache: Any = None
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def seqs(self) -> list[GenSequence]:
        return self.group + self.waiting

    def __len__(self) -> int:
        return len(self.group) + len(self.waiting)

    def add(self, new: Sequence[GenSequence]) -> None:
        """Start `new` now when no group is running (encode, first token), else queue it for the next group.

        Raises PrefillError, the batch unchanged, when the model fails on the new prompts."""
        if self.group:
            self.waiting += list(new)
        else:
            self._start(list(new))

    @torch.inference_mode()
    def step(self) -> None:
        """One decoder step for the running group (or start the waiting one)."""
        if not self.group:
            waiting, self.waiting = self.waiting, []
            self._start(waiting)
            return
        out = self.model(
            encoder_outputs=self.encoded,
            attention_mask=self.mask,
            decoder_input_ids=self.last[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self._accept(out.logits[:, -1])

    def drop_finished(self) -> list[GenSequence]:
        done = [s for s in self.seqs if s.finished]
        if not done:
            return []
        self.waiting = [s for s in self.waiting if not s.finished]
        keep = [i for i, s in enumerate(self.group) if not s.finished]
        if len(keep) < len(self.group):
            self.group = [self.group[i] for i in keep]
            if keep:
                index = torch.tensor(keep, device=self.device)
                self.encoded.last_hidden_state = self.encoded.last_hidden_state[index]
                self.mask, self.last = self.mask[index], self.last[index]
                self.cache.batch_select_indices(index)
            else:
                self.encoded = self.cache = None
        return done

    @torch.inference_mode()
    def _start(self, group: list[GenSequence]) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        group = [s for s in group if not s.finished]
        if not group:
            return
        length = max(len(s.prompt_ids) for s in group)
        ids = torch.tensor(
            [s.prompt_ids + [self.pad_id] * (length - len(s.prompt_ids)) for s in group], device=self.device
        )
        mask = torch.tensor(
            [[1] * len(s.prompt_ids) + [0] * (length - len(s.prompt_ids)) for s in group], device=self.device
        )
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((len(group),), self.start_id, dtype=torch.long, device=self.device)
        try:
            encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask)
            out = self.model(
                encoder_outputs=encoded,
                attention_mask=mask,
                decoder_input_ids=start[:, None],
                cache=cache,
                use_cache=True,
            )
        except Exception as err:  # noqa: BLE001 - the caller decides whether the model or these prompts failed
            raise PrefillError(f"{type(err).__name__}: {err}") from err
        self.group, self.encoded, self.mask, self.cache = group, encoded, mask, cache
        self._accept(out.logits[:, -1])

    def _accept(self, logits: torch.Tensor) -> None:
        tokens = pick_tokens(logits, self.group)
        self.last = torch.tensor(tokens, device=self.device)
        _accept_each(self.group, tokens, logits)


class Seq2SeqRunner(Runner):
    """A loaded encoder-decoder (T5, BART, ...): the prompt is the encoder's input, the completion what the
    decoder writes; sampling, stop sequences and streaming are the decoder runner's."""

    def __init__(self, model: Any, tokenizer: Any):
        super().__init__(model, tokenizer)
        self.context_window = None  # the prompt feeds the encoder; max_new_tokens bounds the decoder

    def new_batch(self) -> Seq2SeqBatch:
        return Seq2SeqBatch(self.model, self.pad_id)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise ValueError("an encoder-decoder (seq2seq) model takes plain prompts, not chat messages")


def embed(model: Any, tokenizer: Any, texts: list[str], *, max_length: int | None = None) -> torch.Tensor:
    """Sentence embeddings: the backbone's last hidden states, mean-pooled over the attention mask and
    L2-normalised (as sentence-transformers does for all-MiniLM-L6-v2); one row per text."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = batch.to(model_device(model))
    with torch.inference_mode():
        hidden = inner.base_model(**batch).last_hidden_state  # e.g. BertModel under a classifier
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The average of the token embeddings, padding excluded."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def class_logits(model: Any, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """A sequence classifier's logits (fp32, on the CPU) for token-id rows, in their order; the rows are
    batched in length order, so a batch pads little. The one classification inference: the runner's
    labels and scores, `llmos eval` and the validation metrics of a classification fine-tune."""
    device = model_device(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    found: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_rows([ids[i] for i in chunk], pad_id)
        mask = pad_rows([[1] * len(ids[i]) for i in chunk], 0)
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for row, i in enumerate(chunk):
            found[i] = logits[row]
    return torch.stack(found)


class EncoderRunner:
    """An encoder (embeddings) or sequence classifier (labels and scores) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 512):
        from llmos_cli.core.models import model_kind

        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.is_classifier = model_kind(model) == "classifier"

    @classmethod
    def load(cls, ref: str | Path, **kwargs: Any) -> EncoderRunner:
        """The encoder runner for the encoder or classifier `ref` names."""
        return _load_as(cls, ref, kwargs)

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc.to(model_device(self.model))

    def count_tokens(self, texts: list[str]) -> int:
        return sum(
            len(ids)
            for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        )

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden states."""
        return embed(self.model, self.tokenizer, texts, max_length=self.max_length).tolist()

    def classify(self, texts: list[str], batch_size: int = 32) -> list[dict[str, float]]:
        """Label -> probability for each text, from the classification head."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        probs = class_logits(self.model, ids, pad_id, batch_size).softmax(-1)
        labels = self.model.config.id2label
        return [{str(labels.get(j, j)): float(p) for j, p in enumerate(row)} for row in probs.tolist()]


RUNNERS: dict[str, type] = {
    "causal": Runner,
    "seq2seq": Seq2SeqRunner,
    "encoder": EncoderRunner,
    "classifier": EncoderRunner,
}


def load_runner(
    info: ModelInfo,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Runner | EncoderRunner:
    """The runner for a model's kind (decoder, seq2seq, encoder or classifier), loaded on `device`."""
    model = info.load(
        device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    return RUNNERS[info.kind](model, info.load_tokenizer(trust_remote_code))


def open_runner(
    info: ModelInfo,
    *,
    device: str = "auto",
    precision: str = "auto",
    keys: tuple[str, str] = ("--device", "--precision"),
    **load_kwargs: Any,
) -> Runner | EncoderRunner:
    """`load_runner` by the one device rule: `device` (auto: CUDA, then MPS, then CPU) and the inference
    dtype (auto: bf16 on GPUs that have it, else fp16; fp32 on CPU). `keys` name the setting in errors."""
    from llmos_cli.core.runtime import inference_dtype, pick_device

    where = pick_device(device, keys[0])
    dtype = inference_dtype(where, precision, keys[1], info.config)
    return load_runner(info, device=where, dtype=dtype, **load_kwargs)


def _load_as(cls: type, ref: str | Path, kwargs: dict[str, Any]) -> Any:
    from llmos_cli.core.models import describe_model
    from llmos_cli.errors import UserError

    info = describe_model(ref)
    if not issubclass(RUNNERS[info.kind], cls):
        what = "generates text" if cls is Runner else "embeds or classifies text"
        raise UserError(f"{info.path} is a {info.kind} model; this runner {what}")
    return load_runner(info, **kwargs)
