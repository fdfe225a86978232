"""The data pipeline every stage prepares its data through: read, clean, deduplicate, (train a
tokenizer), tokenize, pack, split, save, report, judge the data gates; or encode a task format.

Every step streams through Arrow files on disk, so peak memory does not grow with the corpus:
documents are written as they are cleaned, split by a boolean mask (no copy), tokenised batch by
batch in `num_proc` worker processes, packed block by block, and saved as an HF dataset.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.console import out
from llmos_cli.core.data import versions
from llmos_cli.core.data.cache import data_settings, fingerprint, staging_dir
from llmos_cli.core.data.collect import Collector
from llmos_cli.core.data.encode import DOC_BATCH, encode_documents
from llmos_cli.core.data.gates import evaluate, failure_message, records
from llmos_cli.core.data.gates import show as show_gates
from llmos_cli.core.data.pack import Packer, pack_part
from llmos_cli.core.data.read import BadRows, list_files
from llmos_cli.core.data.report import DataReport, count_labels, length_summary, write_length_histogram
from llmos_cli.core.data.split import Part, filter_by_tokens, split_mask, validation_overlap
from llmos_cli.core.data.store import column_names, iter_column, text_features, write_rows
from llmos_cli.core.data.tokenizer import save_tokenizer, train_bpe_tokenizer
from llmos_cli.core.models import load_tokenizer, locate_recipe_model, recipe_tokenizer_dir, tokenizer_folder
from llmos_cli.core.rundir import write_atomic
from llmos_cli.core.writable import disk_full_is_clear
from llmos_cli.errors import EXIT_DATA_GATE, RunFailed, UserError
from llmos_cli.recipe import Recipe

TOKENIZE_BATCH = 512  # documents per tokenizer call for in-memory evaluation sets


@dataclass
class PreparedData:
    path: Path
    fingerprint: str
    tokenizer_dir: Path
    report: dict[str, Any]
    reused: bool

    def summary(self) -> dict[str, Any]:
        """What `llmos data` prints under --json."""
        return {
            "output": str(self.path),
            "fingerprint": self.fingerprint,
            "reused": self.reused,
            "report": self.report,
        }


def prepare(recipe: Recipe, *, force: bool = False) -> PreparedData:
    """Prepare (or reuse) the recipe's dataset in `data.output`, then judge `data.checks`: a failed gate
    raises RunFailed (exit 3) once report.json records it."""
    if recipe.data.format == "text":
        prepared = _prepare_text_format(recipe, force)
    else:
        prepared = _prepare_task_format(recipe, force)
    return _enforce_checks(recipe, prepared)


def plan_steps(recipe: Recipe) -> list[str]:
    """What `prepare` would do, for a dry run's plan."""
    d = recipe.data
    checks = d.checks.model_dump(exclude_none=True)
    gates = (
        [f"check {', '.join(f'{k}={v}' for k, v in checks.items())}; exit 3 if one fails"] if checks else []
    )
    save = f"save to {recipe.data_output} (reused if its fingerprint matches this or a kept version)"
    if d.format != "text":
        return [
            f"read {d.train} (format {d.format}), clean and deduplicate",
            f"encode for {recipe.task} with the model's tokenizer (max_seq_len {d.max_seq_len})",
            *([f"pack whole training examples into rows of up to {d.max_seq_len} tokens"] if d.packs else []),
            save,
            *gates,
        ]
    tokenizer = (
        "use the model's tokenizer"
        if recipe.model.tokenizer or recipe.model.name_or_path
        else f"train a byte-level BPE tokenizer (vocab {d.tokenizer.vocab_size})"
    )
    return [
        f"read {d.train} (format {d.format})",
        "clean and deduplicate",
        tokenizer,
        f"tokenize and pack into blocks of {d.max_seq_len}",
        save,
        *gates,
    ]


def _enforce_checks(recipe: Recipe, prepared: PreparedData) -> PreparedData:
    gates = evaluate(recipe.data.checks, prepared.report.get("measures", {}))
    report_path = prepared.path / "report.json"
    if prepared.report.get("checks", []) != records(gates):  # a reused dataset may be checked anew
        prepared.report["checks"] = records(gates)
        write_atomic(report_path, json.dumps(prepared.report, indent=2, ensure_ascii=False, default=str))
    if gates:
        show_gates(gates)
    message = failure_message(gates, str(report_path))
    if message:
        raise RunFailed(message, exit_code=EXIT_DATA_GATE, result=prepared.summary())
    return prepared


def _prepare_text_format(recipe: Recipe, force: bool) -> PreparedData:
    d = recipe.data
    train_files = list_files(d.train, d.include)
    val_files = list_files(d.validation, d.include) if d.validation else []
    tokenizer_src = tokenizer_source(recipe)
    settings = data_settings(d)
    settings.update(task=recipe.task, seed=recipe.run.seed)
    fp = fingerprint(settings, [*train_files, *val_files], tokenizer_src)
    target = recipe.data_output
    cached = None if force else _reusable(recipe, target, fp)
    if cached:
        return cached

    staged = staging_dir(target, "data.output")
    try:
        with disk_full_is_clear(target):
            report = _prepare(recipe, train_files, val_files, tokenizer_src, fp, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    versions.install(staged, target, recipe.data.keep_versions)
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
        docs = work / "train-docs.arrow"
        n = write_rows(_as_rows(collector.documents(train_files)), docs, text_features(), DOC_BATCH)
        if val_files:
            val_docs = work / "val-docs.arrow"
            val_collector = Collector(d, report, bad)
            n_val = write_rows(
                _as_rows(val_collector.documents(val_files, "validation")),
                val_docs,
                text_features(),
                DOC_BATCH,
            )
            train, val = Part(docs, np.ones(n, bool)), Part(val_docs, np.ones(n_val, bool))
        else:
            is_val = split_mask(n, d.validation_split, recipe.run.seed)
            train, val = Part(docs, ~is_val), Part(docs, is_val)
    finally:
        bad.close()
    report.malformed.update(bad.by_reason)
    if bad.count and bad.quarantine_path and bad.quarantine_path.exists():
        report.quarantine = bad.quarantine_path.name  # beside report.json
        out.warn(f"data: skipped {bad.count} malformed rows ({dict(bad.by_reason)}); see quarantine.jsonl")
    if not train.keep.any():
        names = ", ".join(str(f) for f in train_files)
        if not n:
            raise UserError(f"data.train: no documents in {names}", hint="the files are empty")
        raise UserError(
            f"data.train: no documents left after cleaning {names} ({dict(report.dropped)} dropped)",
            hint="loosen data.clean or check data.text_field",
        )

    overlap = validation_overlap(train, val, collector.near if val_files else None)
    report.validation_overlap = len(overlap)
    if overlap and d.clean.decontaminate:
        val.keep[overlap] = False
        report.validation_overlap_removed = len(overlap)
        report.documents_kept -= len(overlap)

    tokenizer = _tokenizer(recipe, tokenizer_src, train)
    report.tokenizer = {
        "vocab_size": len(tokenizer),
        "trained": tokenizer_src is None,
        "source": str(tokenizer_src) if tokenizer_src else None,
    }
    n_tokens = {
        p.docs: encode_documents(p, tokenizer, d.num_proc)
        for p in {train.docs: train, val.docs: val}.values()
    }

    from datasets import Dataset, DatasetDict

    splits, lengths = {}, {}
    for name, part in (("train", train), ("validation", val)):
        lengths[name] = filter_by_tokens(part, n_tokens[part.docs], d, report)
        blocks, report.splits[name] = pack_part(
            part, tokenizer.eos_token_id, d, name, work / f"{name}-blocks.arrow"
        )
        report.splits[name]["document_tokens"] = length_summary(lengths[name])
        if "label" in column_names(part.encoded):
            report.label_balance[name] = count_labels(iter_column(part.encoded, "label", part.keep))
        splits[name] = Dataset.from_file(str(blocks))

    # datasets writes zero shards for an empty split and then cannot load it: give it one
    DatasetDict(splits).save_to_disk(str(staged), num_shards={k: 1 for k, v in splits.items() if not len(v)})
    del splits  # release the memory maps before the work files go
    shutil.rmtree(work, ignore_errors=True)
    save_tokenizer(tokenizer, staged / "tokenizer")
    write_length_histogram(lengths, staged / "lengths.png", d.max_seq_len)
    report.histogram = "lengths.png"
    (staged / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report


def _as_rows(texts: Iterator[str]) -> Iterator[dict[str, str]]:
    return ({"text": t} for t in texts)


def _tokenizer(recipe: Recipe, source: Path | None, train: Part) -> Any:
    d = recipe.data
    if source is None:
        out.info(
            f"data: training a byte-level BPE tokenizer (vocab {d.tokenizer.vocab_size}) "
            f"on {int(train.keep.sum())} documents"
        )
        texts = iter_column(train.docs, "text", train.keep)
        tokenizer = train_bpe_tokenizer(texts, d.tokenizer.vocab_size, d.tokenizer.min_frequency)
    else:
        tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer at {source} has no EOS token, which packing needs")
    return tokenizer


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


def _prepare_task_format(recipe: Recipe, force: bool) -> PreparedData:
    """instruction, chat, classification, pairs: encoded per example with the model's tokenizer."""
    from datasets import DatasetDict

    from llmos_cli.core.data.formats import prepare_task_dataset, task_fingerprint

    src = tokenizer_source(recipe)
    if src is None:
        raise UserError(
            f"data.format: '{recipe.data.format}' data is encoded with the model's tokenizer",
            hint="set model.name_or_path (or model.tokenizer) to the model you will fine-tune",
        )
    tokenizer = load_tokenizer(src, trust_remote_code=recipe.model.trust_remote_code)
    target = recipe.data_output
    fp = task_fingerprint(recipe, tokenizer, src)  # before reading or encoding: a hit costs no encode
    cached = None if force else _reusable(recipe, target, fp)
    if cached:
        return cached
    splits, info = prepare_task_dataset(recipe, tokenizer, src, known_fingerprint=fp)
    staged = staging_dir(target, "data.output")
    try:
        with disk_full_is_clear(target):
            # an empty split does not survive save_to_disk/load_from_disk: it is left out (loaders add it back)
            DatasetDict({k: v for k, v in splits.items() if len(v)}).save_to_disk(str(staged))
            tokenizer.save_pretrained(str(staged / "tokenizer"))  # it may have gained a chat template
            lengths = {k: example_lengths(v) for k, v in splits.items() if len(v)}
            write_length_histogram(lengths, staged / "lengths.png", recipe.data.max_seq_len)
            info["histogram"] = "lengths.png"
            (staged / "report.json").write_text(json.dumps(info, indent=2, default=str))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    versions.install(staged, target, recipe.data.keep_versions)
    rows = [
        ("rows read", info["rows_read"]),
        ("exact duplicates", info["duplicates_exact"]),
        ("near duplicates", info["duplicates_near"]),
        ("validation rows also in train", info["validation_overlap"]),
        ("  removed (decontaminate)", info["validation_overlap_removed"]),
    ]
    for split in ("train", "validation"):
        for k, v in info[split].items():
            if isinstance(v, dict):
                rows += [(f"{split}: {k} {stat}", x) for stat, x in v.items()]
            else:
                rows.append((f"{split}: {k}", v))
    rows += [(f"class: {k}", v) for k, v in info.get("class_counts", {}).items()]
    rows += [(f"decoded as {k}", v) for k, v in info["redecoded"].items()]
    rows += [(f"masked: {k}", v) for k, v in info["masked"].items()]
    out.table(f"data report ({recipe.data.format})", ["what", "count"], rows)
    out.info(f"data: wrote {target}")
    return PreparedData(target, info["fingerprint"], target / "tokenizer", info, reused=False)


def example_lengths(split: Any) -> np.ndarray:
    """Each example's length in tokens; a packed row holds several, its positions restarting at each."""
    if "position_ids" not in split.column_names:
        return np.array([len(x) for x in split["input_ids"]])
    starts = [np.flatnonzero(np.asarray(p) == 0) for p in split["position_ids"]]
    return np.concatenate(
        [np.diff(s, append=len(p)) for s, p in zip(starts, split["position_ids"], strict=True)]
    )


def tokenizer_source(recipe: Recipe) -> Path | None:
    """The tokenizer to use, or None when one must be trained (no model named, or its folder has none)."""
    m = recipe.model
    if m.tokenizer:
        return recipe_tokenizer_dir(m.tokenizer, recipe.source)
    if m.name_or_path:
        # where finetune finds the model: recipe folder, working directory, registered name, hub
        return tokenizer_folder(locate_recipe_model(m.name_or_path, recipe.source))
    return None


def _reusable(recipe: Recipe, target: Path, fp: str) -> PreparedData | None:
    """The prepared dataset with fingerprint `fp`: in `target`, or a kept earlier version moved back."""
    report = versions.stored_report(target)
    if report is not None and report.get("fingerprint") == fp:
        out.info(f"data: reusing {target} (fingerprint {fp[:12]} matches)")
    elif versions.restore(target, fp, recipe.data.keep_versions):
        out.info(f"data: reusing a kept version of {target} (fingerprint {fp[:12]} matches)")
        report = versions.stored_report(target)
    else:
        return None
    return PreparedData(target, fp, target / "tokenizer", report, reused=True)
