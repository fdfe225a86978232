"""Cleaning steps, reading with on_error, near dedup and packing: unit tests on data written here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmos_cli.core.data.clean import clean_text, fix_mojibake, token_drop_reason
from llmos_cli.core.data.decode import Decoding
from llmos_cli.core.data.dedup import NearDedup
from llmos_cli.core.data.pack import Packer
from llmos_cli.core.data.read import BadRows, field_text, list_files, read_rows
from llmos_cli.core.train.batches import mask_document_starts
from llmos_cli.errors import UserError
from llmos_cli.recipe import CleanSection

CJK = "東京は日本の首都です。北京是中国的首都，上海很大！서울은 한국의 수도입니다."
OTHER = "مرحبا بالعالم — Привет, мир — नमस्ते दुनिया — שלום עולם"


def test_mojibake_repair_and_switch() -> None:
    broken = "café naïve — déjà vu".encode().decode("cp1252")  # UTF-8 bytes read as Windows-1252
    assert broken == "cafÃ© naÃ¯ve â€” dÃ©jÃ\xa0 vu"
    assert fix_mojibake(broken) == "café naïve — déjà vu"
    assert clean_text(broken, CleanSection()) == "café naïve — déjà vu"
    assert fix_mojibake(CJK) == CJK
    assert clean_text(broken, CleanSection(fix_mojibake=False)) == broken


def test_every_cleaning_step_keeps_cjk_and_other_scripts() -> None:
    cfg = CleanSection(mask_urls=True, mask_emails=True, normalize="NFC")
    for text in (CJK, OTHER, "全角：ＡＢＣ，句号。"):
        assert clean_text(text, cfg) == text
    # NFKC folds compatibility forms on purpose (full-width Latin -> ASCII); ideographs stay
    assert clean_text("ＡＢＣ東京", CleanSection(normalize="NFKC")) == "ABC東京"


def test_url_and_email_masking_is_switchable() -> None:
    text = "write to ana.b+x@example.co.uk or see https://example.org/a?b=1. 東京 www.foo.com/x)"
    cfg = CleanSection(mask_urls=True, mask_emails=True)
    assert clean_text(text, cfg) == "write to <EMAIL> or see <URL>. 東京 <URL>)"
    assert (
        clean_text(text, CleanSection(mask_urls=True))
        == "write to ana.b+x@example.co.uk or see <URL>. 東京 <URL>)"
    )
    assert clean_text(text, CleanSection()) == text
    custom = CleanSection(mask_emails=True, email_token="[email]")
    assert clean_text("a@b.io", custom) == "[email]"


def test_control_characters_and_whitespace() -> None:
    text = "a\x00b\x1b[0m\x85c  \r\nd\r\n\n\n\ne\t "
    cfg = CleanSection(fix_mojibake=False)
    assert clean_text(text, cfg) == "ab[0mc\nd\n\ne"
    # with mojibake repair on, a lone C1 control is read as the Windows-1252 character it was
    assert clean_text(text, CleanSection()) == "ab[0m\u2026c\nd\n\ne"
    assert clean_text(text, CleanSection(fix_mojibake=False, control_chars=False, whitespace=False)) == text


def test_token_length_filter() -> None:
    cfg = CleanSection(min_tokens=3, max_tokens=5)
    assert [token_drop_reason(n, cfg) for n in (2, 3, 5, 6)] == [
        "too_few_tokens",
        None,
        None,
        "too_many_tokens",
    ]
    assert token_drop_reason(0, CleanSection()) is None


def test_near_duplicates_found_across_scripts() -> None:
    base = "the quick brown fox jumps over the lazy dog near the river bank every morning at dawn " * 2
    cjk = (
        "今天天气很好，我们一起去公园散步，然后在湖边喝茶聊天，直到太阳下山才回家。"
        "晚上妈妈做了红烧肉和青菜豆腐汤，全家人围坐在桌边，一边吃饭一边聊着明天的旅行计划。"
        "弟弟说他想去海边看日出，姐姐却更想去山里的小村庄住几天，最后爸爸决定两个地方都去。"
    )
    near = NearDedup(threshold=0.8)
    assert not near.seen(base)
    assert near.seen(base.replace("quick", "quack"))  # one word changed
    assert near.seen(base.upper())  # case and spacing do not matter
    assert not near.seen(cjk)
    assert near.seen(cjk.replace("公园", "公圆"))  # works without spaces between words
    assert not near.seen("an entirely different text about owls, stars and the winter night sky")
    assert near.matches(cjk) and not near.matches("something new entirely, nothing alike at all here")


def test_skip_bad_rows_into_quarantine_with_mixed_encodings(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        json.dumps({"text": "東京"}, ensure_ascii=False).encode(),
        '{"text": "café latin-1"}'.encode("latin-1"),  # wrong encoding
        b'{"text": broken',  # bad JSON
        b"[1, 2]",  # not an object
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 5}).encode(),
        json.dumps({"text": "good two"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    quarantine = tmp_path / "q.jsonl"
    bad = BadRows("skip", quarantine)
    rows = read_rows([path], bad=bad, decoding=Decoding("utf-8"))
    texts = [t for r in rows if (t := field_text(r, "text", bad)) is not None]
    bad.close()
    assert texts == ["good one", "東京", "good two"]
    assert bad.by_reason == {
        "encoding": 1,
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "wrong_type": 1,
    }
    records = [json.loads(x) for x in quarantine.read_text().splitlines()]
    assert [r["line"] for r in records] == [3, 4, 5, 6, 7]
    assert all(r["source"] == str(path) for r in records)
    assert records[0]["raw"] == '{"text": "caf\\xe9 latin-1"}'  # the byte shown, never U+FFFD


def test_fail_mode_shows_the_first_few_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{bad\n{"text": "ok"}\n{worse\n')
    with pytest.raises(UserError) as err:
        list(read_rows([path], bad=BadRows("fail")))
    assert (
        "bad.jsonl:2: invalid JSON" in err.value.message and "bad.jsonl:4: invalid JSON" in err.value.message
    )
    assert "on_error=skip" in (err.value.hint or "")


def test_csv_multiline_fields_wrong_width_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,n\n"two\nlines",1\nextra,2,3\ncaf\xe9,4\nlast,5\n')
    bad = BadRows("skip", tmp_path / "q.jsonl")
    rows = list(read_rows([path], bad=bad, decoding=Decoding("utf-8")))
    bad.close()
    assert [(r.data["text"], r.line) for r in rows] == [("two\nlines", 2), ("last", 6)]
    records = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in records] == [(4, "wrong_field_count"), (5, "encoding")]


def test_text_lines_skip_undecodable_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("東京\n".encode() + b"caf\xe9\n" + b"ok\n")
    bad = BadRows("skip")
    assert [r.data["text"] for r in read_rows([path], "line", bad, decoding=Decoding("utf-8"))] == [
        "東京",
        "ok",
    ]
    assert bad.by_reason == {"encoding": 1}


def test_hub_ids_pass_through_and_fail_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = list_files("hub:someone/corpus")
    assert [str(f) for f in files] == ["hub:someone/corpus"]
    with pytest.raises(UserError, match="hub:someone/corpus needs the network"):
        list(read_rows(files))


def test_packer_reset_positions_restart_per_document() -> None:
    packer = Packer(block_size=4, eos_id=0, reset_positions=True)
    blocks = [b for doc in ([1, 2], [3, 4, 5], [6]) for b in packer.add(doc)]
    tail, dropped = packer.finish(keep_tail=True)
    blocks += tail
    assert [b["input_ids"].tolist() for b in blocks] == [[1, 2, 0, 3], [4, 5, 0, 6]]
    # a document cut by a block edge restarts at 0 in the next block; later documents are unchanged
    assert [b["position_ids"].tolist() for b in blocks] == [[0, 1, 2, 0], [0, 1, 2, 0]]
    assert dropped == 1 and tail == []  # the single EOS left has nothing to predict
    labels = mask_document_starts(blocks[0]["input_ids"].astype(np.int64), blocks[0]["position_ids"])
    assert labels.tolist() == [-100, 2, 0, -100]


def test_packer_carries_labels_and_counts_loss_tokens() -> None:
    packer = Packer(block_size=4, eos_id=9)
    blocks = list(packer.add([1, 2, 3], [-100, -100, 3])) + list(packer.add([4], [4]))
    assert [b["labels"].tolist() for b in blocks] == [[-100, -100, 3, 9]]
    tail, _ = packer.finish(keep_tail=True)
    assert tail[0]["labels"].tolist() == [4, 9]
    assert (packer.tokens, packer.loss_tokens) == (6, 4)


def test_packer_single_rows_truncate() -> None:
    packer = Packer(block_size=3, eos_id=0)
    rows = [packer.single(doc) for doc in ([1], [1, 2], [1, 2, 3, 4])]
    assert [r["input_ids"].tolist() for r in rows] == [[1, 0], [1, 2, 0], [1, 2, 3]]
    assert (packer.truncated, packer.documents, packer.tokens) == (1, 3, 8)


def test_reset_positions_keep_packed_documents_apart_in_a_tiny_llama() -> None:
    """The contract with the model side: passing the stored position_ids with no attention mask and
    use_cache=False (a cache turns packed-sequence detection off) attends within each document only."""
    import torch

    from llmos_cli.core.models import build_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = build_model(
        "llama", TINY_MODEL, 50, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    ).eval()
    packer = Packer(block_size=12, eos_id=0, reset_positions=True)
    (block,) = [b for doc in ([5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]) for b in packer.add(doc)]
    ids = torch.as_tensor(block["input_ids"], dtype=torch.long)[None]
    pos = torch.as_tensor(block["position_ids"], dtype=torch.long)[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 6:]
        alone = model(input_ids=ids[:, 6:]).logits[0]
        leaky = model(input_ids=ids).logits[0, 6:]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_count_labels() -> None:
    from llmos_cli.core.data.report import count_labels

    assert count_labels([1, 0, 1, "x"]) == {"0": 1, "1": 2, "x": 1}


def test_map_batches_keeps_order_across_workers(tmp_path: Path) -> None:
    from llmos_cli.core.data.store import iter_column, map_batches, text_features, token_features, write_rows

    src = tmp_path / "docs.arrow"
    write_rows(({"text": "x" * (i % 7)} for i in range(2500)), src, text_features(), batch_size=100)
    n = map_batches(src, tmp_path / "out.arrow", _lengths, token_features(["n_tokens"]), num_proc=2)
    assert n == 2500 and list(iter_column(tmp_path / "out.arrow", "n_tokens")) == [i % 7 for i in range(2500)]


def _lengths(batch: dict) -> dict:
    return {"n_tokens": [len(t) for t in batch["text"]]}


def test_pack_part_carries_labels_and_skips_unkept_rows(tmp_path: Path) -> None:
    from llmos_cli.core.data.pack import pack_part
    from llmos_cli.core.data.split import Part
    from llmos_cli.core.data.store import iter_batches, token_features, write_rows
    from llmos_cli.recipe import DataSection

    docs = tmp_path / "docs.arrow"  # pack_part reads the tokens beside it: docs.tokens.arrow
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [7, 7], "labels": [7, 7]},  # not kept
        {"input_ids": [4, 5], "labels": [-100, 5]},
    ]
    write_rows(iter(rows), docs.with_suffix(".tokens.arrow"), token_features(["input_ids", "labels"]))
    part = Part(docs, np.array([True, False, True]))
    dst, stats = pack_part(part, 0, DataSection(max_seq_len=8), "validation", tmp_path / "blocks.arrow")
    (batch,) = list(iter_batches(dst))
    assert batch == {"input_ids": [[1, 2, 3, 0, 4, 5, 0]], "labels": [[-100, 2, 3, 0, -100, 5, 0]]}
    assert (stats["documents"], stats["tokens"], stats["loss_tokens"]) == (2, 7, 5)
    assert stats["loss_share"] == round(5 / 7, 4)


def test_saved_hf_dataset_and_globs_are_inputs(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["東京", "two"]})}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "a.jsonl").write_text('{"text": "glob one"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "glob two"}\n')
    files = list_files([str(tmp_path / "saved"), str(tmp_path / "*.jsonl")])
    assert [r.data["text"] for r in read_rows(files)] == ["東京", "two", "glob one", "glob two"]


PII = {  # kind: (switch, text, masked text)
    "phone": (
        "mask_phones",
        "call +44 20 7946 0958, (555) 123-4567, 555.123.4567 or 030 1234567.",
        "call <PHONE>, <PHONE>, <PHONE> or <PHONE>.",
    ),
    "ip": (
        "mask_ips",
        "hosts 192.168.1.10 and 2001:db8::8a2e:370:7334 are down",
        "hosts <IP> and <IP> are down",
    ),
    "credit_card": (
        "mask_credit_cards",
        "paid with 4111 1111 1111 1111, amex 378282246310005; not 4111 1111 1111 1112",
        "paid with <CREDIT_CARD>, amex <CREDIT_CARD>; not 4111 1111 1111 1112",  # Luhn fails
    ),
    "iban": (
        "mask_ibans",
        "IBAN DE89 3704 0044 0532 0130 00 AND GB82WEST12345698765432, not DE00370400440532013000",
        "IBAN <IBAN> AND <IBAN>, not DE00370400440532013000",  # mod 97 fails
    ),
}
ORDINARY = [  # numbers that look like personal data to a careless pattern
    "released on 2024-01-15 at 12:30:45, or 07/15/2024, or 15.07.2024",
    "version 1.2.3.4, numpy 1.26.4, v10.0.19041.1 and 1.2.3.4.5; 10.0.0.256 is no address",
    "total 1,234,567.89; pi 3.14159265358979; years 2023 2024 2025",
    "x = 1234567890123456  # an id, Luhn fails: 4111111111111112; ms since epoch 1700000000000",
    "arr[::2], std::vector<int>, a::b::c, MAC de:ad:be:ef:00:01, port 8080:8080, 0x7fff5fbff8a8",
    "isbn 978-3-16-148410-0, zip 12345-6789, 123-45-6789, call 12345, 2 + 3 = 5",
    "uuid 123e4567-e89b-12d3-a456-426614174000, sha 3f786850e387550fdab836ed7e6dc881de23001b",
]


@pytest.mark.parametrize("kind", PII)
def test_personal_data_is_masked_counted_and_switchable(kind: str) -> None:
    switch, text, masked = PII[kind]
    counts: Counter = Counter()
    assert clean_text(text, CleanSection(**{switch: True}), counts) == masked
    assert counts == {kind: masked.count("<")}
    assert clean_text(text, CleanSection()) == text  # every kind is off by default
    token = switch.removeprefix("mask_").removesuffix("s") + "_token"
    assert "[x]" in clean_text(text, CleanSection(**{switch: True, token: "[x]"}))


def test_ordinary_numbers_are_not_personal_data() -> None:
    every = CleanSection(**{switch: True for switch, _, _ in PII.values()}, mask_urls=True, mask_emails=True)
    counts: Counter = Counter()
    for text in ORDINARY:
        assert clean_text(text, every, counts) == text
    assert not counts


def test_masked_counts_reach_the_report(tmp_path: Path) -> None:
    from llmos_cli.core.data.collect import Collector
    from llmos_cli.core.data.report import DataReport
    from llmos_cli.recipe import DataSection

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": PII[k][1]}) + "\n" for k in PII))
    data = DataSection(clean=CleanSection(mask_phones=True, mask_ibans=True, mask_emails=True))
    report = DataReport()
    docs = list(Collector(data, report, BadRows()).documents([path]))
    assert report.masked == {"phone": 4, "iban": 2}
    assert docs[0] == PII["phone"][2] and report.to_dict()["masked"] == {"phone": 4, "iban": 2}


def test_task_format_rows_are_masked_in_every_text_field(tmp_path: Path) -> None:
    from llmos_cli.core.data.formats import read_examples
    from llmos_cli.recipe import DataSection

    path = tmp_path / "chat.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "my card is 4111-1111-1111-1111, call me on +1 (555) 123-4567"},
            {"role": "assistant", "content": "noted, version 1.2.3.4 on 2024-01-15"},
        ],
        "id": 7,
    }
    path.write_text(json.dumps(row) + "\n")
    data = DataSection(format="chat", clean=CleanSection(mask_credit_cards=True, mask_phones=True))
    masked: Counter = Counter()
    (got,) = read_examples([path], data, masked=masked)
    assert got.data["messages"][0]["content"] == "my card is <CREDIT_CARD>, call me on <PHONE>"
    assert got.data["messages"][1] == row["messages"][1] and got.data["id"] == 7
    assert masked == {"credit_card": 1, "phone": 1}


@pytest.mark.parametrize("which", ["bpe", "minilm"])
def test_the_data_encoder_gives_the_ids_of_transformers_call(which: str, tmp_path: Path) -> None:
    """The backend's encode_batch_fast, untruncated and unpadded, against `tokenizer(texts)`: a
    byte-level BPE and MiniLM's WordPiece, whose tokenizer.json truncates at 128 tokens."""
    from llmos_cli.core.data.encode import ids_encoder
    from llmos_cli.core.data.tokenizer import save_tokenizer, train_bpe_tokenizer
    from llmos_cli.core.models import load_tokenizer

    texts = ["Hello, wörld! 東京 café", "", "  spaces  and\ttabs\n", "long " * 300, "<pad> x <eos>"]
    if which == "bpe":
        save_tokenizer(train_bpe_tokenizer(iter(texts * 20), 300, 2), tmp_path / "tok")
        tokenizer = load_tokenizer(tmp_path / "tok")
    else:
        from tests.finetune_fixtures import minilm_dir

        tokenizer = load_tokenizer(minilm_dir())
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ids_encoder(tokenizer)(texts) == expected
    assert max(len(x) for x in expected) > 200  # nothing truncated
