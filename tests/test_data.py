"""The text data path: reading, cleaning, dedup, packing, the saved dataset, its report and cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmos_cli.core.data.clean import clean_text, drop_reason
from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.dedup import ExactDedup
from llmos_cli.core.data.pack import pack_sequences
from llmos_cli.core.data.read import list_files, read_rows
from llmos_cli.errors import UserError
from llmos_cli.recipe import CleanSection, load_recipe
from llmos_cli.stages import data as data_stage


def test_clean_normalises_nfc_controls_and_whitespace() -> None:
    cfg = CleanSection()
    decomposed = "cafe\u0301"  # e + combining acute
    assert clean_text(f"  {decomposed}\x00\x07 ok  \r\n\n\n\nnext\t \n", cfg) == "caf\u00e9 ok\n\nnext"


def test_clean_keeps_indentation_and_other_scripts() -> None:
    text = "def f():\n    return '東京 مرحبا Привет'\n"
    assert clean_text(text, CleanSection()) == text.rstrip("\n")


def test_clean_steps_are_switchable() -> None:
    cfg = CleanSection(normalize="none", control_chars=False, whitespace=False)
    text = "cafe\u0301\x07  \n"
    assert clean_text(text, cfg) == text


def test_length_filters() -> None:
    cfg = CleanSection(min_chars=5, max_chars=10)
    assert drop_reason("   ", cfg) == "empty"
    assert drop_reason("abc", cfg) == "too_short"
    assert drop_reason("a" * 11, cfg) == "too_long"
    assert drop_reason("a" * 7, cfg) is None


def test_exact_dedup() -> None:
    d = ExactDedup()
    assert [d.seen(t) for t in ["a", "b", "a", "a", "c"]] == [False, False, True, True, False]


def test_pack_concatenates_with_eos_and_drops_only_the_tail() -> None:
    blocks, dropped = pack_sequences([[1, 2, 3], [4, 5], [6]], block_size=4, eos_id=0)
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert dropped == 1  # a one-token tail has nothing to predict, even for evaluation


def test_pack_keeps_the_tail_for_evaluation() -> None:
    blocks, dropped = pack_sequences([[1, 2, 3, 4, 5]], block_size=4, eos_id=9, keep_tail=True)
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 4], [5, 9]] and dropped == 0


def test_read_formats(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.csv").write_text('text,other\n"three, with comma",x\n')
    (tmp_path / "c.tsv").write_text("text\tother\nfour\ty\n")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "five"}]))
    (tmp_path / "e.txt").write_text("six\nsix b")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["seven"]}), tmp_path / "f.parquet")
    rows = list(read_rows(list_files(str(tmp_path))))
    assert [r.data["text"] for r in rows] == [
        "one",
        "two",
        "three, with comma",
        "four",
        "five",
        "six\nsix b",
        "seven",
    ]
    assert (rows[1].source.endswith("a.jsonl"), rows[1].line) == (True, 3)
    assert [r.data["text"] for r in read_rows([tmp_path / "e.txt"], "line")] == ["six", "six b"]


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        list(read_rows([path]))


def test_bad_encoding_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt:2: not valid UTF-8"):
        list(read_rows([path], decoding=Decoding("utf-8")))  # strict: `auto` would read it as cp1252


def test_folder_include_globs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["a.py", "b.py", "sub/c.py", "notes.md"]:
        (tmp_path / name).write_text("x")
    assert [p.name for p in list_files(str(tmp_path), ["*.py"])] == ["a.py", "b.py"]
    assert [p.name for p in list_files(str(tmp_path), ["**/*.py"])] == ["a.py", "b.py", "c.py"]
    with pytest.raises(UserError, match="no input files"):
        list_files(str(tmp_path), ["*.rs"])


def test_data_stage_end_to_end(tiny_recipe: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines + lines[:5] + ['{"text": "   "}']) + "\n")  # 5 duplicates, 1 empty
    recipe = load_recipe(tiny_recipe)
    prepared = data_stage.run(recipe)
    report = json.loads((prepared.path / "report.json").read_text())
    assert report["documents_read"] == 406
    assert report["duplicates_exact"] == 5 and report["dropped"] == {"empty": 1}
    assert report["documents_kept"] == 400
    assert report["splits"]["validation"]["documents"] == 40 and report["splits"]["train"]["documents"] == 360
    assert report["tokenizer"]["trained"] and report["tokenizer"]["vocab_size"] == 300

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    ds = load_from_disk(str(prepared.path))
    blocks = np.array(ds["train"]["input_ids"])
    assert blocks.shape == (report["splits"]["train"]["blocks"], 32)
    tok = AutoTokenizer.from_pretrained(str(prepared.path / "tokenizer"))
    assert int((blocks == tok.eos_token_id).sum()) >= 300  # one EOS per document
    assert "the" in tok.decode(blocks[0].tolist())
    total = sum(len(x) for x in ds["validation"]["input_ids"])
    assert total == report["splits"]["validation"]["tokens"]  # nothing dropped from validation


def test_data_cache_reused_then_rebuilt_when_input_changes(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe)
    first = data_stage.run(recipe)
    again = data_stage.run(load_recipe(tiny_recipe))
    assert again.reused and again.fingerprint == first.fingerprint
    changed = data_stage.run(load_recipe(tiny_recipe, ["data.max_seq_len=16"]))
    assert not changed.reused and changed.fingerprint != first.fingerprint
    with (tmp_path / "corpus.jsonl").open("a") as fh:
        fh.write('{"text": "a brand new document about owls"}\n')
    assert not data_stage.run(load_recipe(tiny_recipe, ["data.max_seq_len=16"])).reused
    # no staging leftovers: only the shelf of earlier versions (data.keep_versions: 2) beside data.output
    assert [p.name for p in tmp_path.glob(".data.*")] == [".data.versions"]
    assert len(list((tmp_path / ".data.versions").iterdir())) == 2


def test_missing_field_names_file_line_and_field(tiny_recipe: Path, tmp_path: Path, run_cli) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\n{"body": "wrong field"}\n')
    res = run_cli("data", tiny_recipe)
    assert res.code == 2
    assert "corpus.jsonl:2: missing field 'text'" in res.stderr and "body" in res.stderr
    assert not (tmp_path / "data").exists()
