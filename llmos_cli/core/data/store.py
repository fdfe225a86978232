"""Write a stream of rows to an Arrow file on disk and open it memory-mapped, so no stage of the
pipeline holds a whole corpus in memory."""

from __future__ import annotations

from collections.abc import Iterable
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
) -> Any:
    """Stream `rows` into an Arrow file at `path`; returns the memory-mapped `datasets.Dataset`."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=batch_size)
    try:
        for row in rows:
            writer.write(row)
        writer.finalize()
    finally:
        writer.close()
    return Dataset.from_file(str(path))
