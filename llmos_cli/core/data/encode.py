"""Tokenise a file of documents in worker processes, batch by batch, into a file of token ids."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from llmos_cli.console import out
from llmos_cli.core.data.split import Part
from llmos_cli.core.data.store import iter_column, map_batches, token_features

DOC_BATCH = 256  # documents per Arrow record batch: the unit each tokenising worker holds
_ENCODE: Callable[[list[str]], list[list[int]]] | None = None  # set in each tokenising process


def worker_count(num_proc: int | str, n_docs: int) -> int:
    """Tokenising processes: `auto` is every core this process may run on; never more than there are
    batches of documents, so a small corpus runs in this process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = cores if num_proc == "auto" else int(num_proc)
    return max(1, min(wanted, -(-n_docs // DOC_BATCH)))


def ids_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """The token ids of a batch of texts, no special tokens added: what `tokenizer(texts)` gives. A fast
    tokenizer encodes through its own copy of the Rust backend, set to truncate and pad nothing, with
    `encode_batch_fast` (no character offsets computed): 1.2x faster here than transformers' call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_truncation()
    fast.no_padding()
    fast.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return lambda texts: [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]


def _use_tokenizer(tokenizer: Any) -> None:
    global _ENCODE
    _ENCODE = ids_encoder(tokenizer)


def _encode_batch(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
    assert _ENCODE is not None, "map_batches runs _use_tokenizer first"
    ids = _ENCODE(batch["text"])
    return {"input_ids": ids, "n_tokens": [len(x) for x in ids]}


def encode_documents(part: Part, tokenizer: Any, num_proc: int | str) -> np.ndarray:
    """Tokenise every document of `part.docs` into `part.encoded` (`num_proc` worker processes, or
    `auto`); returns the token count of each document. The output does not depend on `num_proc`."""
    num_proc = worker_count(num_proc, len(part.keep))
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    features = token_features(["input_ids", "n_tokens"])
    with out.progress(f"tokenize {part.docs.stem}", total=len(part.keep)) as bar:
        n = map_batches(
            part.docs,
            part.encoded,
            _encode_batch,
            features,
            num_proc=num_proc,
            initializer=_use_tokenizer,
            initargs=(tokenizer,),
        )
        bar.update(n)
    return np.fromiter(iter_column(part.encoded, "n_tokens"), dtype=np.int64, count=n)
