"""`convert`: between file formats and between instruction and chat layouts, on files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos_cli.core.data.convert import convert
from llmos_cli.core.data.read import read_rows
from llmos_cli.errors import UserError

INSTRUCTIONS = [
    {"system": "be brief", "prompt": "2+2?", "response": "4", "id": 1},
    {"prompt": "東京はどこ？", "response": "日本です。", "id": 2},
    {"prompt": 'say "hi",\nplease', "response": "hi", "id": 3},
]


def _rows(path: Path) -> list[dict]:
    return [r.data for r in read_rows([path], "line")]


def test_formats_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in INSTRUCTIONS), encoding="utf-8")
    chain = ["a.parquet", "b.json", "c.jsonl"]
    prev = src
    for name in chain:
        result = convert(prev, tmp_path / name)
        assert result["rows"] == 3
        prev = tmp_path / name
    assert _rows(prev) == [
        {k: r.get(k) for k in ("system", "prompt", "response", "id")} for r in INSTRUCTIONS
    ]
    convert(src, tmp_path / "d.tsv")
    tsv = _rows(tmp_path / "d.tsv")  # CSV/TSV cells are text
    assert [r["prompt"] for r in tsv] == [r["prompt"] for r in INSTRUCTIONS] and tsv[0]["id"] == "1"
    assert not list(tmp_path.glob(".*.tmp"))


def test_instruction_to_chat_and_back(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in INSTRUCTIONS), encoding="utf-8")
    convert(src, tmp_path / "chat.csv", to_layout="chat")  # messages stored as JSON text in a cell
    convert(tmp_path / "chat.csv", tmp_path / "chat.jsonl", to_layout="chat")
    chats = _rows(tmp_path / "chat.jsonl")
    assert chats[0]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert chats[1]["messages"][1]["content"] == "日本です。" and chats[1]["id"] == "2"
    convert(tmp_path / "chat.jsonl", tmp_path / "back.jsonl", to_layout="instruction")
    back = _rows(tmp_path / "back.jsonl")
    assert [(r["prompt"], r["response"], r.get("system")) for r in back] == [
        (r["prompt"], r["response"], r.get("system")) for r in INSTRUCTIONS
    ]


def test_multi_turn_chat_has_no_instruction_layout(tmp_path: Path) -> None:
    turns = [{"role": r, "content": "x"} for r in ("user", "assistant", "user", "assistant")]
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": turns[:2]}) + "\n" + json.dumps({"messages": turns}) + "\n")
    with pytest.raises(
        UserError, match=r"chat\.jsonl:2: a chat of roles \[user, assistant, user, assistant\]"
    ):
        convert(src, tmp_path / "out.jsonl", to_layout="instruction")
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*.tmp"))


def test_text_lines_and_bad_requests(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("first line\n第二行\n", encoding="utf-8")
    assert convert(src, tmp_path / "out.jsonl")["rows"] == 2
    convert(tmp_path / "out.jsonl", tmp_path / "again.txt")
    assert (tmp_path / "again.txt").read_text(encoding="utf-8") == "first line\n第二行\n"
    with pytest.raises(UserError, match="cannot write 'x.xml'"):
        convert(src, tmp_path / "x.xml")
    with pytest.raises(UserError, match="unknown layout 'alpaca'"):
        convert(src, tmp_path / "x.jsonl", to_layout="alpaca")
