"""Files in any encoding: UTF-8 first, the file's legacy encoding for the rest, counted, never U+FFFD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.read import BadRows, read_rows
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection

TWEETS = [
    "Loved the café downtown, best crème brûlée ever!",
    "“Great” game tonight — 3–1 win, worth every €",
    "plain ascii row, nothing special",
    "Señor Müller paid 5 € for a naïve résumé",
    "another plain row",
]
MIXED_SCRIPTS = [
    "東京は日本の首都です。北京是中国的首都。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "서울은 한국의 수도입니다 — Привет, мир",
]


def _texts(path: Path, decoding: Decoding, field: str = "text") -> list[str]:
    return [r.data[field] for r in read_rows([path], "line", BadRows("fail"), decoding=decoding)]


def _non_ascii(texts: list[str]) -> int:
    return sum(not t.isascii() for t in texts)


def _csv(rows: list[str]) -> str:
    return "text,label\n" + "".join(f'"{t}",{i % 2}\n' for i, t in enumerate(rows))


def test_cp1252_csv(tmp_path: Path) -> None:
    path = tmp_path / "tweets.csv"
    path.write_bytes(_csv(TWEETS).encode("cp1252"))
    decoding = Decoding()
    assert _texts(path, decoding) == TWEETS
    assert decoding.redecoded == {"cp1252": _non_ascii(TWEETS)}  # ASCII rows are UTF-8 as they are


def test_latin1_jsonl(tmp_path: Path) -> None:
    texts = ["Ça va? Très bien, señor.", "Größe und Maße", "ascii only", "Ærø, Øresund, São Paulo"]
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("latin-1")
    )
    decoding = Decoding()
    assert _texts(path, decoding) == texts
    assert decoding.redecoded == {"cp1252": 3}


def test_utf8_file_with_some_cp1252_lines(tmp_path: Path) -> None:
    utf8 = [*MIXED_SCRIPTS, "déjà vu in UTF-8"]
    legacy = ["café written on Windows", "naïve “smart quotes” — and €"]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in utf8]
    raw = [line.encode() for line in lines]
    raw[1:1] = [json.dumps({"text": legacy[0]}, ensure_ascii=False).encode("cp1252")]
    raw.append(json.dumps({"text": legacy[1]}, ensure_ascii=False).encode("cp1252"))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    decoding = Decoding()
    assert _texts(path, decoding) == [utf8[0], legacy[0], *utf8[1:], legacy[1]]
    assert decoding.redecoded == {"cp1252": 2}


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_bom(tmp_path: Path, codec: str) -> None:
    texts = [*MIXED_SCRIPTS, *TWEETS]
    path = tmp_path / "wide.csv"
    body = _csv(texts)
    path.write_bytes(body.encode(codec) if codec != "utf-16-be" else b"\xfe\xff" + body.encode(codec))
    decoding = Decoding()
    assert _texts(path, decoding) == texts
    assert decoding.redecoded == {codec[:6]: len(texts)}


def test_mixed_scripts_utf8_untouched_and_bom_dropped(tmp_path: Path) -> None:
    path = tmp_path / "scripts.jsonl"
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in MIXED_SCRIPTS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    decoding = Decoding()
    assert _texts(path, decoding) == MIXED_SCRIPTS
    assert decoding.redecoded == {}


def test_non_western_legacy_file_is_detected(tmp_path: Path) -> None:
    texts = [
        "Привет, мир! Как у тебя дела сегодня?",
        "Всё хорошо, спасибо большое.",
        "Москва — столица России.",
    ]
    path = tmp_path / "ru.txt"
    path.write_bytes("\n".join(texts).encode("cp1251") + b"\n")
    decoding = Decoding()
    assert _texts(path, decoding) == texts
    assert decoding.redecoded == {"cp1251": 3}


def test_a_whole_document_file_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes("line one\ncafé crème\nline three\n".encode("cp1252"))
    decoding = Decoding()
    rows = list(read_rows([path], "document", decoding=decoding))
    assert [r.data["text"] for r in rows] == ["line one\ncafé crème\nline three\n"]
    assert decoding.redecoded == {"cp1252": 1}


def test_a_named_codec_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("ok\ncafé\n".encode("cp1252"))
    assert _texts(path, Decoding("cp1252")) == ["ok", "café"]
    bad = BadRows("skip")
    assert [r.data["text"] for r in read_rows([path], "line", bad, decoding=Decoding("utf-8"))] == ["ok"]
    assert bad.by_reason == {"encoding": 1}
    with pytest.raises(UserError, match=r"t\.txt:2: not valid UTF-8 \(byte 3 of the line\)"):
        list(read_rows([path], "line", decoding=Decoding("utf-8")))
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        DataSection(encoding="klingon")


def test_nothing_becomes_a_replacement_character(tmp_path: Path) -> None:
    """Bytes no encoding fits are a bad row shown with escapes, not U+FFFD in the data."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\x81\x8d\x8f\x90\x9d"}\n')
    bad = BadRows("skip", tmp_path / "q.jsonl")
    texts = [r.data["text"] for r in read_rows([path], bad=bad, decoding=Decoding("cp1252"))]
    bad.close()
    assert texts == ["ok"] and bad.by_reason == {"encoding": 1}
    quarantined = (tmp_path / "q.jsonl").read_text()
    assert "\\\\x81" in quarantined and "\ufffd" not in quarantined


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_not_read_as_utf8_with_nuls(tmp_path: Path, codec: str) -> None:
    texts = [*MIXED_SCRIPTS, *TWEETS]
    path = tmp_path / "wide.csv"
    path.write_bytes(_csv(texts).encode(codec))  # ASCII in UTF-16 is valid UTF-8, full of NULs
    decoding = Decoding()
    assert _texts(path, decoding) == texts
    assert decoding.redecoded == {"utf-16": len(texts)}


def test_a_stray_nul_byte_keeps_a_file_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("東京 café\nnul \x00 inside\nplain\n".encode())
    decoding = Decoding()
    assert _texts(path, decoding) == ["東京 café", "nul \x00 inside", "plain"]
    assert decoding.redecoded == {}
