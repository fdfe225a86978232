"""Task formats -> token rows: instruction, chat, classification and pairs (seq2seq).

Each encoder turns one input row into the columns its collator expects, and decides where the loss
goes: instruction and chat rows carry loss on responses (and the EOS / end-of-turn that closes them)
only; classification rows carry one integer label; pair rows carry the target as `labels`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmos_cli.core.data import IGNORE_INDEX
from llmos_cli.core.data.cache import data_settings, fingerprint
from llmos_cli.core.data.clean import clean_fields
from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.gates import share
from llmos_cli.core.data.pack import pack_examples
from llmos_cli.core.data.read import Row, field_text, list_files, read_rows
from llmos_cli.core.data.report import length_summary
from llmos_cli.core.data.task_rows import RowCounts, SplitRows, drop_validation_overlap
from llmos_cli.core.models import recipe_model_dir
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection, Recipe

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Used when neither the recipe nor the tokenizer gives a chat template; EOS closes every turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = {"system", "user", "assistant", "tool"}

Encoded = dict[str, Any] | str  # the columns of one example, or the reason it was dropped
TRUNCATED = "_truncated"  # set in an encoded example cut at the length cap; counted, not stored


def task_fingerprint(recipe: Recipe, tokenizer: Any, tokenizer_dir: Path | None = None) -> str:
    """What a prepared task dataset depends on, known before anything is read or encoded: the data
    settings, task and seed, every input file's contents, a labelling step's model, and the tokenizer (its
    files in `tokenizer_dir`, its vocabulary and, for chat data, the template encoding will apply)."""
    d = recipe.data
    if not d.train:
        raise UserError(f"{recipe.source}: data.train: no training data given")
    template = None
    if d.format in ("chat", "preference"):  # the template encoding will apply (set_chat_template's choice)
        template = d.chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    files = list_files(d.train, d.include) + (list_files(d.validation, d.include) if d.validation else [])
    if d.label.model:  # a labelling step's model decides the labels
        files.append(recipe_model_dir(d.label.model, recipe.source, "data.label.model"))
    settings = data_settings(d)
    settings.update(task=recipe.task, seed=recipe.run.seed, tokenizer=tokenizer_hash(tokenizer, template))
    return fingerprint(settings, files, tokenizer_dir)


def prepare_task_dataset(
    recipe: Recipe, tokenizer: Any, tokenizer_dir: Path | None = None, known_fingerprint: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Read, split and encode `data.train`/`data.validation` for the recipe's task and format.

    Returns a DatasetDict (train, validation) and an info dict: counts, drops, fingerprint, and for
    classification the label names and class counts. The tokenizer may gain a chat template.
    """
    from datasets import Dataset, DatasetDict

    d = recipe.data
    fp = known_fingerprint or task_fingerprint(recipe, tokenizer, tokenizer_dir)
    train_files = list_files(d.train, d.include)
    val_files = list_files(d.validation, d.include) if d.validation else []
    decoding, masked, counts = Decoding(d.encoding), Counter(), RowCounts()
    seen_train = SplitRows(d)
    train_rows = seen_train.unique(read_examples(train_files, d, decoding, masked), counts)
    if val_files:
        val_rows = SplitRows(d).unique(read_examples(val_files, d, decoding, masked), counts)
    else:
        train_rows, val_rows = split_rows(train_rows, d.validation_split, recipe.run.seed)
    val_rows = drop_validation_overlap(
        train_rows, val_rows, d, counts, seen_train.near if val_files else None
    )
    if not train_rows:
        raise UserError(f"data.train: {d.train} holds no rows")
    labelled: dict[str, Any] = {}
    if d.label.model:
        from llmos_cli.core.data.label import label_step

        train_rows, low_train = label_step(train_rows, d, recipe.source)
        val_rows, low_val = label_step(val_rows, d, recipe.source) if val_rows else (val_rows, 0)
        labelled = {
            "model": d.label.model,
            "rows": len(train_rows) + len(val_rows),
            "under_min_score": low_train + low_val,
        }
        if not train_rows:
            raise UserError(f"data.label: every training row scored under min_score {d.label.min_score}")

    info: dict[str, Any] = {
        "format": d.format,
        "task": recipe.task,
        "redecoded": dict(decoding.redecoded),
        "masked": dict(masked),
        "rows_read": counts.read,
        "duplicates_exact": counts.duplicates_exact,
        "duplicates_near": counts.duplicates_near,
        "validation_overlap": counts.validation_overlap,
        "validation_overlap_removed": counts.validation_overlap_removed,
        **({"labelled": labelled} if labelled else {}),
    }
    if d.format == "chat":
        info["chat_template"] = set_chat_template(tokenizer, d.chat_template)
    if d.format == "classification":
        names = label_names(train_rows, d)
        info["label_names"] = names
        encode = classification_encoder(tokenizer, d, {n: i for i, n in enumerate(names)})
    else:
        encode = _ENCODERS[d.format](tokenizer, d)

    splits = {}
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        columns, dropped, truncated = _encode_all(rows, encode)
        examples = len(next(iter(columns.values()), []))
        info[name] = {"examples": examples, "dropped": dict(dropped), "truncated": truncated}
        if "input_ids" in columns:
            lengths = np.array([len(x) for x in columns["input_ids"]], dtype=np.int64)
            info[name]["tokens"] = int(lengths.sum())
            info[name]["example_tokens"] = length_summary(lengths)
        if name == "train" and d.packs and columns.get("input_ids"):  # validation stays one example a row
            columns, info[name]["packing"] = pack_examples(columns, d.max_seq_len)
        splits[name] = Dataset.from_dict(columns)
        if d.format == "preference":
            from llmos_cli.core.data.preference import preference_lengths

            info[name].update(preference_lengths(columns))
    if len(splits["train"]) == 0:
        raise UserError(f"data.train: every row was dropped ({info['train']['dropped']})")
    if d.format == "classification":
        per_class = Counter(splits["train"]["label"])
        info["class_counts"] = {n: per_class.get(i, 0) for i, n in enumerate(info["label_names"])}
    info["measures"] = task_measures(counts, info)
    info["fingerprint"] = fp
    return DatasetDict(splits), info


def read_examples(
    files: list[Path], d: DataSection, decoding: Decoding | None = None, masked: Counter | None = None
) -> list[Row]:
    """The rows of `files` (up to data.max_documents), for encoding or evaluation, with every text field
    cleaned as `data.clean` says (personal data masked and counted per kind in `masked`)."""
    rows = []
    masked = masked if masked is not None else Counter()
    for row in read_rows(files, d.text_unit, decoding=decoding or Decoding(d.encoding)):
        if d.max_documents is not None and len(rows) >= d.max_documents:
            break
        row.data = clean_fields(row.data, d.clean, masked)
        rows.append(row)
    return rows


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out a seeded random `fraction` of whole examples for validation."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(rows)))
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def _encode_all(rows: list[Row], encode: Callable[[Row], Encoded]) -> tuple[dict[str, list], Counter, int]:
    """The columns of the encoded rows, the reasons rows were dropped, and how many were truncated."""
    columns: dict[str, list] = {}
    dropped: Counter = Counter()
    truncated = 0
    for row in rows:
        example = encode(row)
        if isinstance(example, str):
            dropped[example] += 1
            continue
        truncated += bool(example.pop(TRUNCATED, False))
        for key, value in example.items():
            columns.setdefault(key, []).append(value)
    return columns, dropped, truncated


def task_measures(counts: RowCounts, info: dict[str, Any]) -> dict[str, Any]:
    """What data gates limit (see core/data/gates.py), for task formats, as for text documents."""
    examples = info["train"]["examples"] + info["validation"]["examples"]
    dropped = sum(sum(info[s]["dropped"].values()) for s in ("train", "validation"))
    classes = info.get("class_counts", {})
    return {
        "rows": examples,
        "duplicate_share": share(counts.duplicates_exact + counts.duplicates_near, counts.read),
        "truncated_share": share(info["train"]["truncated"] + info["validation"]["truncated"], examples),
        "train_validation_overlap": counts.validation_overlap - counts.validation_overlap_removed,
        "label_share": share(max(classes.values()), sum(classes.values())) if classes else None,
        "dropped_share": share(dropped, counts.read),
    }


def tokenizer_hash(tokenizer: Any, chat_template: str | None = None) -> str:
    """The tokenizer's vocabulary and chat template (`chat_template`, else its own)."""
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, chat_template or getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer itself starts sequences with it (llama-style), else nothing."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _capped(tokenizer: Any, text: str, max_len: int) -> tuple[list[int], bool]:
    """`text`'s ids (special tokens included) cut to `max_len` as the tokenizer truncates, and whether
    they had to be."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) <= max_len:
        return ids, False
    return list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"]), True


def _with_eos(ids: list[int], eos: int | None, max_len: int) -> list[int]:
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids[: max_len - 1], eos]
    return ids[:max_len]


# ---------------------------------------------------------------- instruction


def instruction_prompt(row: Row, d: DataSection) -> str:
    """The prompt text: `data.template` (or the alpaca template) filled with the row's fields."""
    prompt = field_text(row, d.prompt_field)
    has_input = isinstance(row.data.get("input"), str) and row.data["input"].strip()
    template = d.template or (ALPACA_INPUT_TEMPLATE if has_input else ALPACA_TEMPLATE)
    try:
        return template.format(**{**row.data, "prompt": prompt})
    except KeyError as err:
        raise UserError(
            f"{row.source}:{row.line}: data.template names field {err} that the row lacks",
            hint=f"fields present: {', '.join(map(str, row.data))}",
        ) from None
    except (IndexError, ValueError) as err:
        raise UserError(
            f"data.template: not a valid template ({err}); use {{prompt}} and {{field}}"
        ) from None


def instruction_encoder(tokenizer: Any, d: DataSection) -> Callable[[Row], Encoded]:
    bos, eos = _bos(tokenizer), tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which instruction data needs to end responses")

    def encode(row: Row) -> Encoded:
        prompt = bos + _ids(tokenizer, instruction_prompt(row, d))
        response = [*_ids(tokenizer, field_text(row, d.response_field)), eos]
        ids = (prompt + response)[: d.max_seq_len]
        labels = ((prompt if d.train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response)[: d.max_seq_len]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            return "prompt_too_long"
        return {"input_ids": ids, "labels": labels, TRUNCATED: len(prompt) + len(response) > d.max_seq_len}

    return encode


# ---------------------------------------------------------------- chat


def set_chat_template(tokenizer: Any, template: str | None) -> str:
    """The recipe's template wins, then the tokenizer's own, then llmos's default (said on stderr);
    saved with final/. Returns which: data.chat_template, tokenizer or llmos default."""
    if template:
        tokenizer.chat_template = template
        return "data.chat_template"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    from llmos_cli.console import out

    out.warn(
        "data.chat_template: the tokenizer has no chat template: using llmos's default "
        "(<|role|> turns closed by EOS), saved with the model; set data.chat_template to choose another"
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "llmos default"


def messages_of(row: Row, field: str) -> list[dict[str, str]]:
    msgs = row.data.get(field)
    where = f"{row.source}:{row.line}"
    if not isinstance(msgs, list) or not msgs:
        raise UserError(
            f"{where}: field '{field}' should be a non-empty list of messages (set data.messages_field)"
        )
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
            raise UserError(
                f"{where}: message {i + 1} should be {{'role': one of {sorted(ROLES)}, 'content': text}}, got {m!r}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def chat_encoder(tokenizer: Any, d: DataSection) -> Callable[[Row], Encoded]:
    """Render with the chat template; assistant turns (through their end-of-turn) carry the loss.

    Each assistant span runs from the end of the conversation rendered up to it with a generation
    prompt, to the end of the conversation rendered through it; a token carries loss when its
    characters overlap a span (so a token merging a space with the reply's first word counts).
    """

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(row: Row) -> Encoded:
        msgs = messages_of(row, d.messages_field)
        if not any(m["role"] == "assistant" for m in msgs):
            return "no_assistant_turn"
        try:
            text = render(msgs, False)
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    before, through = render(msgs[:i], True), render(msgs[: i + 1], False)
                    if not (text.startswith(through) and through.startswith(before)):
                        raise UserError(
                            "data.chat_template: rendering a conversation is not prefix-stable, so assistant "
                            "turns cannot be located; use a template that renders turns in order"
                        )
                    spans.append((len(before), len(through)))
        except UserError:
            raise
        except Exception as err:  # jinja raises many types for a template/data mismatch
            raise UserError(
                f"{row.source}:{row.line}: the chat template failed on this conversation: {err}"
            ) from None
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"][: d.max_seq_len])
        labels = [
            t if d.train_on_prompt or any(a < e and b > s for s, e in spans) else IGNORE_INDEX
            for t, (a, b) in zip(ids, enc["offset_mapping"][: d.max_seq_len], strict=True)
        ]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            return "prompt_too_long"
        return {"input_ids": ids, "labels": labels, TRUNCATED: len(enc["input_ids"]) > d.max_seq_len}

    return encode


# ---------------------------------------------------------------- classification


def label_key(row: Row, field: str) -> str:
    if field not in row.data:
        raise UserError(
            f"{row.source}:{row.line}: missing field '{field}'",
            hint=f"fields present: {', '.join(map(str, row.data))}; set data.label_field",
        )
    value = row.data[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(
            f"{row.source}:{row.line}: label '{field}' should be text or an integer, got {value!r}"
        )
    return str(value)


def label_names(rows: list[Row], d: DataSection) -> list[str]:
    """`data.label_names`, else the training labels sorted (numerically when they are all integers)."""
    if d.label_names:
        return list(d.label_names)
    seen = {label_key(r, d.label_field) for r in rows}
    numeric = all(k.lstrip("-").isdigit() for k in seen)
    names = sorted(seen, key=int if numeric else str)
    if len(names) < 2:
        raise UserError(f"data.train: classification needs at least 2 labels, found {names}")
    return names


def classification_encoder(
    tokenizer: Any, d: DataSection, label2id: dict[str, int]
) -> Callable[[Row], Encoded]:
    def encode(row: Row) -> Encoded:
        key = label_key(row, d.label_field)
        if key not in label2id:
            raise UserError(
                f"{row.source}:{row.line}: label {key!r} is not one of the labels ({', '.join(label2id)})",
                hint="every label must appear in the training data, or list them all in data.label_names",
            )
        ids, cut = _capped(tokenizer, field_text(row, d.text_field), d.max_seq_len)
        return {"input_ids": ids, "label": label2id[key], TRUNCATED: cut}

    return encode


# ---------------------------------------------------------------- pairs (seq2seq)


def pairs_encoder(tokenizer: Any, d: DataSection) -> Callable[[Row], Encoded]:
    eos, target_len = tokenizer.eos_token_id, d.max_target_len or d.max_seq_len

    def encode(row: Row) -> Encoded:
        source = d.task_prefix + field_text(row, d.source_field)
        target = field_text(row, d.target_field)
        if not target.strip():
            return "empty_target"
        ids, cut_source = _capped(tokenizer, source, d.max_seq_len)
        labels, cut_target = _capped(tokenizer, target, target_len)
        return {
            "input_ids": _with_eos(ids, eos, d.max_seq_len),
            "labels": _with_eos(labels, eos, target_len),
            TRUNCATED: cut_source or cut_target,
        }

    return encode


def _preference_encoder(tokenizer: Any, d: DataSection) -> Callable[[Row], Encoded]:
    from llmos_cli.core.data.preference import preference_encoder  # it builds on this module

    return preference_encoder(tokenizer, d)


_ENCODERS: dict[str, Callable[[Any, DataSection], Callable[[Row], Encoded]]] = {
    "instruction": instruction_encoder,
    "chat": chat_encoder,
    "pairs": pairs_encoder,
    "preference": _preference_encoder,
}
