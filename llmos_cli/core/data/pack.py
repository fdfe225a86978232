"""Pack tokenised documents into fixed-length blocks for causal-LM training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_sequences(
    docs: Sequence[Sequence[int]], block_size: int, eos_id: int, *, keep_tail: bool = False
) -> tuple[list[np.ndarray], int]:
    """Concatenate documents, each followed by EOS, and cut into blocks of `block_size` tokens.

    The last partial block is dropped (training) or kept as a shorter block (`keep_tail`, for an
    evaluation that must see every token). Returns the blocks and the number of tokens dropped.
    """
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    stream = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for doc in docs:
        n = len(doc)
        stream[pos : pos + n] = doc
        stream[pos + n] = eos_id
        pos += n + 1
    n_full = len(stream) // block_size
    blocks = list(stream[: n_full * block_size].reshape(n_full, block_size))
    tail = stream[n_full * block_size :]
    if keep_tail and len(tail) > 1:
        blocks.append(tail)
        return blocks, 0
    return blocks, len(tail)
