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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llmos_cli.core.models import ModelInfo

FinishReason = str  # "stop" (eos or a stop sequence), "length", "cancelled", "error"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
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
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(
            self.params.seed if self.params.seed is not None else random.getrandbits(63)
        )
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


def pick_tokens(logits: torch.Tensor, seqs: Sequence[GenSequence]) -> list[int]:
    """Next token per row: repetition penalty, then greedy or temperature/top-k/top-p sampling (HF semantics)."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_ids + seq.output_ids, dtype=torch.long, device=row.device)
            score = row.gather(0, seen)
            score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            row = row.scatter(0, seen, score)
        if p.greedy:
            chosen[i] = int(row.argmax())
            continue
        row = row / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
        # The generator is a CPU one (per-sequence seeds are device-independent): sample on the host.
        chosen[i] = int(torch.multinomial(row.softmax(-1).cpu(), 1, generator=seq.generator))
    return chosen


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
        """Prefill `new` prompts together, pick their first tokens, and merge them into the running batch."""
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
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
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
        for seq, tok in zip(new, tokens, strict=True):
            seq.accept(tok)

    def _accept(self, seqs: list[GenSequence], logits: torch.Tensor) -> None:
        tokens = pick_tokens(logits, seqs)
        self.last = torch.tensor(tokens, device=self.device)
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.accept(tok)


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
        self, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[str], None] | None = None
    ) -> GenSequence:
        return GenSequence(list(prompt_ids), params, self.tokenizer, self.eos_ids, on_delta)

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        *,
        batch_size: int = 16,
        on_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Complete every prompt, `batch_size` at a time; a finished sequence's slot goes to the next prompt."""
        params.check()
        seqs = [self.sequence(p if isinstance(p, list) else self.encode(p), params) for p in prompts]
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
            prompt if isinstance(prompt, list) else self.encode(prompt), params, pieces.append
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
        """Start `new` now when no group is running (encode, first token), else queue it for the next group."""
        self.waiting += list(new)
        if not self.group:
            self._start()

    @torch.inference_mode()
    def step(self) -> None:
        """One decoder step for the running group (or start the waiting one)."""
        if not self.group:
            self._start()
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
    def _start(self) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        self.group, self.waiting = self.waiting, []
        if not self.group:
            return
        length = max(len(s.prompt_ids) for s in self.group)
        ids = torch.tensor(
            [s.prompt_ids + [self.pad_id] * (length - len(s.prompt_ids)) for s in self.group],
            device=self.device,
        )
        self.mask = torch.tensor(
            [[1] * len(s.prompt_ids) + [0] * (length - len(s.prompt_ids)) for s in self.group],
            device=self.device,
        )
        self.encoded = self.model.get_encoder()(input_ids=ids, attention_mask=self.mask)
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.last = torch.full((len(self.group),), self.start_id, dtype=torch.long, device=self.device)
        self.step()

    def _accept(self, logits: torch.Tensor) -> None:
        tokens = pick_tokens(logits, self.group)
        self.last = torch.tensor(tokens, device=self.device)
        for seq, tok in zip(self.group, tokens, strict=True):
            seq.accept(tok)


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

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> list[dict[str, float]]:
        """Label -> probability for each text, from the classification head."""
        probs = self.model(**self._batch(texts)).logits.float().softmax(-1)
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
    return load_runner(info, device=where, dtype=inference_dtype(where, precision, keys[1]), **load_kwargs)


def _load_as(cls: type, ref: str | Path, kwargs: dict[str, Any]) -> Any:
    from llmos_cli.core.models import describe_model
    from llmos_cli.errors import UserError

    info = describe_model(ref)
    if not issubclass(RUNNERS[info.kind], cls):
        what = "generates text" if cls is Runner else "embeds or classifies text"
        raise UserError(f"{info.path} is a {info.kind} model; this runner {what}")
    return load_runner(info, **kwargs)


def model_device(model: Any) -> torch.device:
    """Where a model's weights are (the CPU for one without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
