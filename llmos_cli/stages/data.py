"""`llmos data`: read, clean, deduplicate, (train a tokenizer), tokenize, pack, split, save, report."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_cli.console import out
from llmos_cli.core.data.cache import fingerprint, replace_dir, staging_dir
from llmos_cli.core.data.clean import clean_text, drop_reason
from llmos_cli.core.data.dedup import ExactDedup
from llmos_cli.core.data.pack import pack_sequences
from llmos_cli.core.data.read import field_text, list_files, read_rows
from llmos_cli.core.data.report import DataReport
from llmos_cli.core.data.tokenizer import save_tokenizer, train_bpe_tokenizer
from llmos_cli.core.models import load_tokenizer
from llmos_cli.errors import UserError
from llmos_cli.recipe import Recipe

TOKENIZE_BATCH = 512


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

    report = DataReport(fingerprint=fp, files=len(train_files) + len(val_files))
    train_docs = read_documents(recipe, train_files, report)
    if val_files:
        val_docs = read_documents(recipe, val_files, report)
    else:
        train_docs, val_docs = _split(train_docs, d.validation_split, recipe.run.seed)
    if not train_docs:
        raise UserError(f"data.train: no documents left after cleaning ({dict(report.dropped)} dropped)")

    if tokenizer_src is None:
        out.info(
            f"data: training a byte-level BPE tokenizer (vocab {d.tokenizer.vocab_size}) on {len(train_docs)} documents"
        )
        tokenizer = train_bpe_tokenizer(iter(train_docs), d.tokenizer.vocab_size, d.tokenizer.min_frequency)
    else:
        tokenizer = load_tokenizer(tokenizer_src, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer at {tokenizer_src} has no EOS token, which packing needs")
    report.tokenizer = {
        "vocab_size": len(tokenizer),
        "trained": tokenizer_src is None,
        "source": str(tokenizer_src) if tokenizer_src else None,
    }

    from datasets import Dataset, DatasetDict

    splits = {}
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        blocks, stats = tokenize_and_pack(docs, tokenizer, d.max_seq_len, name)
        report.splits[name] = stats
        splits[name] = Dataset.from_dict({"input_ids": blocks})

    staged = staging_dir(target)
    DatasetDict(splits).save_to_disk(str(staged))
    save_tokenizer(tokenizer, staged / "tokenizer")
    (staged / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    replace_dir(staged, target)
    report.show()
    out.info(f"data: wrote {target}")
    return PreparedData(target, fp, target / "tokenizer", report.to_dict(), reused=False)


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


def read_documents(recipe: Recipe, files: list[Path], report: DataReport) -> list[str]:
    d = recipe.data
    dedup = ExactDedup() if d.clean.dedup else None
    docs: list[str] = []
    for row in read_rows(files, d.text_unit):
        if d.max_documents is not None and len(docs) >= d.max_documents:
            break
        report.documents_read += 1
        text = clean_text(field_text(row, d.text_field), d.clean)
        reason = drop_reason(text, d.clean)
        if reason:
            report.dropped[reason] += 1
        elif dedup is not None and dedup.seen(text):
            report.duplicates_exact += 1
        else:
            docs.append(text)
    report.documents_kept += len(docs)
    return docs


def _split(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split whole documents (never blocks) so validation text is unseen in training."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(docs)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def tokenize_and_pack(docs: list[str], tokenizer: Any, block: int, name: str) -> tuple[Any, dict[str, int]]:
    """Tokenise in batches and pack; every split but train keeps its last partial block."""
    ids: list[list[int]] = []
    with out.progress(f"tokenize {name}", total=len(docs)) as bar:
        for start in range(0, len(docs), TOKENIZE_BATCH):
            chunk = docs[start : start + TOKENIZE_BATCH]
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
            bar.update(len(chunk))
    blocks, dropped_tail = pack_sequences(ids, block, tokenizer.eos_token_id, keep_tail=name != "train")
    stats = {
        "documents": len(docs),
        "tokens": int(sum(len(x) + 1 for x in ids)),
        "blocks": len(blocks),
        "block_size": block,
        "tail_tokens_dropped": int(dropped_tail),
    }
    return blocks, stats
