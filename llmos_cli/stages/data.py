"""`llmos data`: read, clean, deduplicate, (train a tokenizer), tokenize, pack, split, save, report.

Every step streams through Arrow files on disk (memory-mapped), so peak memory does not grow with
the corpus: documents are written as they are cleaned, tokenised with `datasets.map` (`num_proc`
workers) and packed block by block.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.console import out
from llmos_cli.core.data.cache import fingerprint, replace_dir, staging_dir
from llmos_cli.core.data.clean import token_drop_reason
from llmos_cli.core.data.collect import Collector
from llmos_cli.core.data.dedup import ExactDedup, NearDedup
from llmos_cli.core.data.pack import Packer
from llmos_cli.core.data.read import BadRows, list_files
from llmos_cli.core.data.report import DataReport, count_labels, length_summary, write_length_histogram
from llmos_cli.core.data.store import text_features, token_features, write_rows
from llmos_cli.core.data.tokenizer import save_tokenizer, train_bpe_tokenizer
from llmos_cli.core.models import load_tokenizer
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection, Recipe

TOKENIZE_BATCH = 512
ITER_BATCH = 1000


@dataclass
class PreparedData:
    path: Path
    fingerprint: str
    tokenizer_dir: Path
    report: dict[str, Any]
    reused: bool


def run(recipe: Recipe, *, force: bool = False) -> PreparedData:
    d = recipe.data
    if d.format != "text":
        raise UserError(f"data.format: '{d.format}' is not supported by this version yet (supported: text)")
    if not d.train:
        raise UserError(f"{recipe.source}: data.train: no training data given")
    train_files = list_files(d.train, d.include)
    val_files = list_files(d.validation, d.include) if d.validation else []
    tokenizer_src = _tokenizer_source(recipe)
    settings = d.model_dump(mode="json", exclude={"output", "num_proc", "train", "validation"})
    settings.update(task=recipe.task, seed=recipe.run.seed)
    fp = fingerprint(settings, [*train_files, *val_files], tokenizer_src)
    target = recipe.data_output
    cached = _cached(target, fp)
    if cached and not force:
        out.info(f"data: reusing {target} (fingerprint {fp[:12]} matches)")
        return cached

    staged = staging_dir(target)
    try:
        report = _prepare(recipe, train_files, val_files, tokenizer_src, fp, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir(staged, target)
    report.show()
    out.info(f"data: wrote {target}")
    return PreparedData(target, fp, target / "tokenizer", report.to_dict(), reused=False)


def _prepare(
    recipe: Recipe,
    train_files: list[Path],
    val_files: list[Path],
    tokenizer_src: Path | None,
    fp: str,
    staged: Path,
) -> DataReport:
    """Build the dataset, tokenizer, report and histogram inside `staged`; returns the report."""
    d = recipe.data
    work = staged / ".work"
    report = DataReport(fingerprint=fp, files=len(train_files) + len(val_files))
    bad = BadRows(d.on_error, staged / "quarantine.jsonl")
    try:
        collector = Collector(d, report, bad)
        docs = write_rows(
            _as_rows(collector.documents(train_files)), work / "train-docs.arrow", text_features()
        )
        if val_files:
            val_collector = Collector(d, report, bad)
            val = write_rows(
                _as_rows(val_collector.documents(val_files, "validation")),
                work / "val-docs.arrow",
                text_features(),
            )
            train = docs
        else:
            train, val = split_documents(docs, d.validation_split, recipe.run.seed)
    finally:
        bad.close()
    report.malformed.update(bad.by_reason)
    if bad.count and bad.quarantine_path and bad.quarantine_path.exists():
        report.quarantine = bad.quarantine_path.name  # beside report.json
        out.warn(f"data: skipped {bad.count} malformed rows ({dict(bad.by_reason)}); see quarantine.jsonl")
    if not len(train):
        raise UserError(f"data.train: no documents left after cleaning ({dict(report.dropped)} dropped)")

    overlap = validation_overlap(train, val, collector.near if val_files else None)
    report.validation_overlap = len(overlap)
    if overlap and d.clean.decontaminate:
        drop = set(overlap)
        val = val.select([i for i in range(len(val)) if i not in drop])
        report.validation_overlap_removed = len(overlap)
        report.documents_kept -= len(overlap)

    tokenizer = _tokenizer(recipe, tokenizer_src, train)
    report.tokenizer = {
        "vocab_size": len(tokenizer),
        "trained": tokenizer_src is None,
        "source": str(tokenizer_src) if tokenizer_src else None,
    }

    from datasets import DatasetDict

    splits, lengths = {}, {}
    for name, split_docs in (("train", train), ("validation", val)):
        encoded = encode_documents(split_docs, tokenizer, d, work / name, fp)
        encoded, n_tokens = filter_by_tokens(encoded, d, report)
        lengths[name] = n_tokens
        splits[name], report.splits[name] = pack_split(encoded, tokenizer.eos_token_id, d, name, work / name)
        report.splits[name]["document_tokens"] = length_summary(n_tokens)
        if "label" in encoded.column_names:
            report.label_balance[name] = count_labels(encoded, "label")

    # datasets writes zero shards for an empty split and then cannot load it: give it one
    DatasetDict(splits).save_to_disk(str(staged), num_shards={k: 1 for k, v in splits.items() if not len(v)})
    del splits
    shutil.rmtree(work, ignore_errors=True)
    save_tokenizer(tokenizer, staged / "tokenizer")
    write_length_histogram(lengths, staged / "lengths.png", d.max_seq_len)
    report.histogram = "lengths.png"
    (staged / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report


def split_documents(docs: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split whole documents (never blocks) so validation text is unseen in training."""
    n = len(docs)
    if fraction <= 0 or n < 2:
        return docs, docs.select([])
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(fraction * n))
    return docs.select(np.sort(order[n_val:])), docs.select(np.sort(order[:n_val]))


def validation_overlap(train: Any, val: Any, near: NearDedup | None = None) -> list[int]:
    """Indices of validation documents that also appear in train: exactly, or (with `near`, an LSH
    index of the train documents) as near-duplicates."""
    if not len(val):
        return []
    seen = ExactDedup()
    for text in _texts(train):
        seen.seen(text)
    return [
        i for i, text in enumerate(_texts(val)) if text in seen or (near is not None and near.matches(text))
    ]


def _as_rows(texts: Iterator[str]) -> Iterator[dict[str, str]]:
    return ({"text": t} for t in texts)


def _texts(ds: Any) -> Iterator[str]:
    for batch in ds.iter(batch_size=ITER_BATCH):
        yield from batch["text"]


def _tokenizer(recipe: Recipe, source: Path | None, train: Any) -> Any:
    d = recipe.data
    if source is None:
        out.info(
            f"data: training a byte-level BPE tokenizer (vocab {d.tokenizer.vocab_size}) on {len(train)} documents"
        )
        tokenizer = train_bpe_tokenizer(_texts(train), d.tokenizer.vocab_size, d.tokenizer.min_frequency)
    else:
        tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer at {source} has no EOS token, which packing needs")
    return tokenizer


def encode_documents(docs: Any, tokenizer: Any, d: DataSection, cache: Path, fp: str) -> Any:
    """Tokenise with `datasets.map` (batched, `num_proc` workers), writing Arrow under `cache`."""
    if d.num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    cache.mkdir(parents=True, exist_ok=True)
    features = token_features(["input_ids", "n_tokens"])
    if not len(docs):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": [], "n_tokens": []}, features=features)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "n_tokens": [len(x) for x in ids]}

    return docs.map(
        encode,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        num_proc=d.num_proc if len(docs) >= 2 * d.num_proc else None,
        remove_columns=docs.column_names,
        features=features,
        cache_file_name=str(cache / "encoded.arrow"),
        new_fingerprint=f"{fp[:32]}-{cache.name}",  # hashing the tokenizer closure is slow and pointless here
        desc=f"tokenize {cache.name}",
    )


def filter_by_tokens(encoded: Any, d: DataSection, report: DataReport) -> tuple[Any, np.ndarray]:
    """Drop documents outside `clean.min_tokens`/`max_tokens`; returns the kept rows and their lengths."""
    n_tokens = np.asarray(encoded.with_format("numpy")["n_tokens"], dtype=np.int64)
    reasons = (
        [token_drop_reason(int(n), d.clean) for n in n_tokens]
        if (d.clean.min_tokens or d.clean.max_tokens)
        else []
    )
    if not any(reasons):
        return encoded, n_tokens
    for reason, n in Counter(r for r in reasons if r).items():
        report.dropped[reason] += n
        report.documents_kept -= n
    keep = [i for i, r in enumerate(reasons) if r is None]
    return encoded.select(keep), n_tokens[keep]


def pack_split(
    encoded: Any, eos_id: int, d: DataSection, name: str, work: Path
) -> tuple[Any, dict[str, Any]]:
    """Blocks of `max_seq_len` tokens (packing) or one truncated row per document; train drops the
    last partial block, other splits keep it so evaluation sees every token."""
    reset = d.packing and d.packing_mode == "reset_positions"
    has_labels = "labels" in encoded.column_names
    columns = ["input_ids", *(["labels"] if has_labels else []), *(["position_ids"] if reset else [])]
    packer = Packer(d.max_seq_len, eos_id, reset_positions=reset)
    dropped = 0

    def rows() -> Iterator[dict[str, Any]]:
        nonlocal dropped
        for batch in encoded.iter(batch_size=ITER_BATCH):
            labels = batch["labels"] if has_labels else [None] * len(batch["input_ids"])
            for ids, lab in zip(batch["input_ids"], labels, strict=True):
                if d.packing:
                    yield from packer.add(ids, lab)
                else:
                    yield packer.single(ids, lab)
        if d.packing:
            tail, dropped = packer.finish(keep_tail=name != "train")
            yield from tail

    blocks = write_rows(rows(), work / "blocks.arrow", token_features(columns), batch_size=256)
    p = packer
    stats = {
        "documents": p.documents,
        "tokens": p.tokens,
        "blocks": len(blocks),
        "block_size": d.max_seq_len,
        "packing": d.packing_mode if d.packing else "none",
        "tail_tokens_dropped": dropped,
        "truncated": p.truncated,
        "truncation_rate": round(p.truncated / p.documents, 4) if p.documents else 0.0,
        "loss_tokens": p.loss_tokens,
        "loss_share": round(p.loss_tokens / p.tokens, 4) if p.tokens else 0.0,
    }
    return blocks, stats


# ---------------------------------------------------------------- small-data helpers (eval)


def read_documents(recipe: Recipe, files: list[Path], report: DataReport) -> list[str]:
    """Clean, deduplicated documents of `files` in memory (for evaluation sets)."""
    bad = BadRows("fail")
    docs = list(Collector(recipe.data, report, bad).documents(files))
    report.malformed.update(bad.by_reason)
    return docs


def tokenize_and_pack(docs: list[str], tokenizer: Any, block: int, name: str) -> tuple[Any, dict[str, int]]:
    """Tokenise in memory and pack; every split but train keeps its last partial block."""
    packer = Packer(block, tokenizer.eos_token_id)
    blocks: list[np.ndarray] = []
    for start in range(0, len(docs), TOKENIZE_BATCH):
        for ids in tokenizer(docs[start : start + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            blocks += [b["input_ids"] for b in packer.add(ids)]
    tail, dropped = packer.finish(keep_tail=name != "train")
    blocks += [b["input_ids"] for b in tail]
    stats = {
        "documents": len(docs),
        "tokens": packer.tokens,
        "blocks": len(blocks),
        "block_size": block,
        "tail_tokens_dropped": int(dropped),
    }
    return blocks, stats


def _tokenizer_source(recipe: Recipe) -> Path | None:
    """The tokenizer to use, or None when one must be trained."""
    m = recipe.model
    for candidate in (m.tokenizer, m.name_or_path):
        if candidate and Path(candidate).is_dir():
            p = Path(candidate)
            p = p / "final" if (p / "final").is_dir() else p
            if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
                return p
            if candidate == m.tokenizer:
                raise UserError(f"model.tokenizer: {candidate} holds no tokenizer files")
    if m.tokenizer:
        raise UserError(f"model.tokenizer: not found: {m.tokenizer}")
    return None


def _cached(target: Path, fp: str) -> PreparedData | None:
    report_path = target / "report.json"
    if not report_path.exists():
        return None
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError:
        return None
    if report.get("fingerprint") != fp:
        return None
    return PreparedData(target, fp, target / "tokenizer", report, reused=True)
