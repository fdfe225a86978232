"""Arrow files on disk as the pipeline's working storage: write rows as they stream past, read them
back batch by batch (plain reads, not memory maps, so resident memory stays at one batch), and map a
function over the batches in worker processes.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

TEXT_BATCH = 1000  # rows buffered before a write: bounds memory whatever the corpus size


def text_features() -> Any:
    from datasets import Features, Value

    return Features({"text": Value("string")})


def token_features(columns: Iterable[str]) -> Any:
    """int32 token columns (`input_ids`, `labels`, `position_ids`) and int32 scalars (`n_tokens`)."""
    from datasets import Features, List, Value

    scalars = {"n_tokens"}
    return Features({c: Value("int32") if c in scalars else List(Value("int32")) for c in columns})


def write_rows(
    rows: Iterable[dict[str, Any]], path: Path, features: Any, batch_size: int = TEXT_BATCH
) -> int:
    """Stream `rows` into an Arrow file at `path`; returns the number of rows written."""
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(path), writer_batch_size=batch_size) as writer:
        for row in rows:
            writer.write(row)
        n, _ = writer.finalize()
    return n


def iter_batches(path: Path, columns: list[str] | None = None) -> Iterator[dict[str, list[Any]]]:
    """The file's record batches as column lists, read one at a time."""
    import pyarrow as pa

    with pa.OSFile(str(path)) as fh:
        for batch in pa.ipc.open_stream(fh):
            if columns is not None:
                batch = batch.select(columns)
            yield batch.to_pydict()


def column_names(path: Path) -> list[str]:
    import pyarrow as pa

    with pa.OSFile(str(path)) as fh:
        return pa.ipc.open_stream(fh).schema.names


def iter_column(path: Path, column: str, keep: Any = None) -> Iterator[Any]:
    """Values of one column, optionally only rows where the boolean array `keep` is True."""
    i = 0
    for batch in iter_batches(path, [column]):
        values = batch[column]
        if keep is None:
            yield from values
        else:
            yield from (v for v, k in zip(values, keep[i : i + len(values)], strict=True) if k)
        i += len(values)


def map_batches(
    src: Path,
    dst: Path,
    fn: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    features: Any,
    *,
    num_proc: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> int:
    """Write `fn(batch)` for every batch of `src` to `dst`, in order, with `num_proc` forked workers.

    At most two batches per worker are in flight, so memory does not grow with the file. `fn` must
    be a module-level function (it is pickled); give workers their state with `initializer`.
    """
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=features, path=str(dst)) as writer:
        if num_proc <= 1:
            if initializer is not None:
                initializer(*initargs)
            for batch in iter_batches(src):
                writer.write_batch(fn(batch))
        else:
            ctx = multiprocessing.get_context("fork")  # workers inherit loaded modules and initargs
            with ctx.Pool(num_proc, initializer=initializer, initargs=initargs) as pool:
                pending: deque = deque()
                for batch in iter_batches(src):
                    pending.append(pool.apply_async(fn, (batch,)))
                    if len(pending) >= 2 * num_proc:
                        writer.write_batch(pending.popleft().get())
                while pending:
                    writer.write_batch(pending.popleft().get())
        n, _ = writer.finalize()
    return n
