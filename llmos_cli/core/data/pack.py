"""Pack tokenised documents into fixed-length blocks for causal-LM training, streaming.

`concat` joins documents with EOS separators. `reset_positions` also stores `position_ids` that
restart at 0 at every document start inside a block: transformers (v5) turns such position ids
into a block-diagonal causal mask when no 2D attention mask and no KV cache are passed (call the
model with `position_ids=..., use_cache=False`; sdpa, eager, flex and flash attention), so no token
attends across a document boundary.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.core.data import IGNORE_INDEX
from llmos_cli.core.data.split import Part
from llmos_cli.core.data.store import column_names, iter_batches, token_features, write_rows
from llmos_cli.recipe import DataSection


class Packer:
    """Feed documents with `add`, collect full blocks as they fill, then `finish` for the tail.

    Memory holds at most one block plus one document. With `labels` (per-token targets, -100 for
    no loss) the blocks carry a `labels` column too; EOS separators carry loss.
    """

    def __init__(self, block_size: int, eos_id: int | None, *, reset_positions: bool = False) -> None:
        self.block_size, self.eos_id, self.reset_positions = block_size, eos_id, reset_positions
        self._ids: list[int] = []
        self._labels: list[int] = []
        self._pos: list[int] = []
        self.with_labels: bool | None = None
        self.documents = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.truncated = 0

    def add(self, ids: Sequence[int], labels: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
        if self.with_labels is None:
            self.with_labels = labels is not None
        ids = list(ids)
        labels = list(labels) if labels is not None else None
        if self.eos_id is not None:
            ids.append(self.eos_id)
            if labels is not None:
                labels.append(self.eos_id)
        self.documents += 1
        self.tokens += len(ids)
        self.loss_tokens += len(ids) if labels is None else sum(1 for x in labels if x != IGNORE_INDEX)
        self._ids += ids
        if self.with_labels:
            self._labels += labels if labels is not None else ids
        if self.reset_positions:
            self._pos += range(len(ids))
        while len(self._ids) >= self.block_size:
            yield self._cut(self.block_size)

    def single(self, ids: Sequence[int], labels: Sequence[int] | None = None) -> dict[str, Any]:
        """One document as its own row (packing off): EOS-terminated, cut to `block_size` tokens."""
        ids = [*ids, *([self.eos_id] if self.eos_id is not None else [])]
        if labels is not None:
            labels = [*labels, *([self.eos_id] if self.eos_id is not None else [])]
        self.documents += 1
        self.truncated += len(ids) > self.block_size
        ids = ids[: self.block_size]
        row: dict[str, Any] = {"input_ids": np.asarray(ids, dtype=np.int32)}
        self.tokens += len(ids)
        if labels is not None:
            labels = labels[: self.block_size]
            row["labels"] = np.asarray(labels, dtype=np.int32)
            self.loss_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
        else:
            self.loss_tokens += len(ids)
        return row

    def finish(self, keep_tail: bool) -> tuple[list[dict[str, Any]], int]:
        """The last partial block (kept when `keep_tail` and it has something to predict) and the
        number of tokens dropped."""
        n = len(self._ids)
        if keep_tail and n > 1:
            return [self._cut(n)], 0
        self._ids, self._labels, self._pos = [], [], []
        return [], n

    def _cut(self, n: int) -> dict[str, Any]:
        block: dict[str, Any] = {"input_ids": np.asarray(self._ids[:n], dtype=np.int32)}
        del self._ids[:n]
        if self.with_labels:
            block["labels"] = np.asarray(self._labels[:n], dtype=np.int32)
            del self._labels[:n]
        if self.reset_positions:
            pos = np.asarray(self._pos[:n], dtype=np.int32)
            if pos[0] != 0:  # a document continued from the previous block restarts at 0
                starts = np.flatnonzero(pos == 0)
                end = int(starts[0]) if len(starts) else n
                pos[:end] -= pos[0]
            block["position_ids"] = pos
            del self._pos[:n]
        return block


def pack_sequences(
    docs: Sequence[Sequence[int]], block_size: int, eos_id: int, *, keep_tail: bool = False
) -> tuple[list[np.ndarray], int]:
    """Concatenate documents, each followed by EOS, and cut into blocks of `block_size` tokens.

    The last partial block is dropped (training) or kept as a shorter block (`keep_tail`, for an
    evaluation that must see every token). Returns the blocks and the number of tokens dropped.
    """
    packer = Packer(block_size, eos_id)
    blocks = [b["input_ids"] for doc in docs for b in packer.add(doc)]
    tail, dropped = packer.finish(keep_tail)
    return blocks + [b["input_ids"] for b in tail], dropped


def pack_part(part: Part, eos_id: int, d: DataSection, name: str, dst: Path) -> tuple[Path, dict[str, Any]]:
    """Blocks of `max_seq_len` tokens (packing) or one truncated row per document, written to `dst`;
    train drops the last partial block, other splits keep it so evaluation sees every token."""
    reset = d.packs and d.packing_mode == "reset_positions"
    has_labels = "labels" in column_names(part.encoded)
    columns = ["input_ids", *(["labels"] if has_labels else []), *(["position_ids"] if reset else [])]
    packer = Packer(d.max_seq_len, eos_id, reset_positions=reset)
    dropped = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal dropped
        i = 0
        for batch in iter_batches(part.encoded, columns[: 1 + has_labels]):
            labels = batch["labels"] if has_labels else [None] * len(batch["input_ids"])
            for ids, lab in zip(batch["input_ids"], labels, strict=True):
                i += 1
                if not part.keep[i - 1]:
                    continue
                if d.packs:
                    yield from packer.add(ids, lab)
                else:
                    yield packer.single(ids, lab)
        if d.packs:
            tail, dropped = packer.finish(keep_tail=name != "train")
            yield from tail

    n_blocks = write_rows(rows(), dst, token_features(columns), batch_size=256)
    p = packer
    stats = {
        "documents": p.documents,
        "tokens": p.tokens,
        "blocks": n_blocks,
        "block_size": d.max_seq_len,
        "packing": d.packing_mode if d.packs else "none",
        "tail_tokens_dropped": dropped,
        "truncated": p.truncated,
        "truncation_rate": round(p.truncated / p.documents, 4) if p.documents else 0.0,
        "loss_tokens": p.loss_tokens,
        "loss_share": round(p.loss_tokens / p.tokens, 4) if p.tokens else 0.0,
    }
    return dst, stats


def pack_examples(
    columns: dict[str, list[Any]], block_size: int
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Encoded examples (chat, instruction: `input_ids`, `labels`) packed whole into rows of at most
    `block_size` tokens with `position_ids` restarting at each example, so each attends to itself alone
    (see the module docstring). Best-fit decreasing: the longest example first, each into the row with
    the least room that still holds it; no example is cut, and no EOS is added (the template ends turns).
    Returns the packed columns and their stats."""
    lengths = [len(x) for x in columns["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    members: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the first fit is the best fit
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            row, free = len(members), block_size
            members.append([])
        else:
            free, row = room.pop(at)
        members[row].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], row))
    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in members:
        packed["input_ids"].append([t for i in row for t in columns["input_ids"][i]])
        packed["labels"].append([t for i in row for t in columns["labels"][i]])
        packed["position_ids"].append([p for i in row for p in range(lengths[i])])
    tokens = sum(lengths)
    stats = {
        "packing": "reset_positions",
        "blocks": len(members),
        "block_size": block_size,
        "fill": round(tokens / (len(members) * block_size), 4) if members else 0.0,
    }
    return packed, stats
