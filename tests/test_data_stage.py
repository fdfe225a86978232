"""`llmos data` end to end on messy inputs: skip/quarantine, near dups, overlap, packing modes, CJK."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from llmos_cli.recipe import load_recipe
from llmos_cli.stages import data as data_stage
from tests.conftest import toy_documents, write_recipe

CJK_DOCS = [
    "今天天气很好，我们一起去公园散步。",
    "東京は日本の首都で、人口がとても多い都市です。",
    "서울은 한국의 수도이고 아름다운 도시입니다.",
    "北京是中国的首都，有很多历史悠久的名胜古迹。",
]


def varied_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of 25-40 words drawn from 300 made-up words: unlike each other, unlike toy_documents."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(300)
    ]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(25, 40))) + "." for _ in range(n)]


def _recipe(tmp_path: Path, data: dict) -> Path:
    body = {
        "run": {"name": "d", "seed": 0},
        "data": {
            "train": "train.jsonl",
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
            "max_seq_len": 32,
            "output": str(tmp_path / "out"),
            **data,
        },
    }
    return write_recipe(tmp_path / "recipe.yaml", body)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )


def test_messy_corpus_skip_quarantine_near_dups_overlap_and_reset_positions(tmp_path: Path) -> None:
    docs = varied_documents(120)
    near = docs[0].replace(" ", "  ", 3) + " extra"  # near-duplicate of docs[0]
    mojibake = "café au lait, déjà vu".encode().decode("cp1252")
    good = [*CJK_DOCS, mojibake, *docs, near]
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in good]
    lines[5:5] = [b'{"text": oops', b'{"txt": "wrong field"}', '{"text": "caf\xe9"}'.encode("latin-1")]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _write_jsonl(
        tmp_path / "val.jsonl",
        [docs[3], docs[7], "a fresh validation text about owls and foxes, unlike any other."],
    )
    recipe = load_recipe(
        _recipe(
            tmp_path,
            {
                "validation": "val.jsonl",
                "on_error": "skip",
                "packing_mode": "reset_positions",
                "clean": {"near_dedup": True, "near_dedup_threshold": 0.7},
            },
        )
    )
    prepared = data_stage.run(recipe)
    report = json.loads((prepared.path / "report.json").read_text())
    assert report["malformed"] == {"invalid_json": 1, "missing_field": 1}
    assert report["redecoded"] == {"cp1252": 1}  # the Latin-1 line is read, not quarantined
    quarantined = [json.loads(x) for x in (prepared.path / "quarantine.jsonl").read_text().splitlines()]
    assert [q["line"] for q in quarantined] == [6, 7]
    assert report["quarantine"] == "quarantine.jsonl" and report["histogram"] == "lengths.png"
    assert report["duplicates_near"] == 1
    assert report["validation_overlap"] == 2 and report["validation_overlap_removed"] == 2
    assert report["splits"]["validation"]["documents"] == 1
    assert report["splits"]["train"]["documents"] == len(good) - 1 + 1  # less the near-dup, plus "café"
    assert report["documents_kept"] == len(good) - 1 + 1 + 1
    assert (prepared.path / "lengths.png").read_bytes()[:4] == b"\x89PNG"

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    ds = load_from_disk(str(prepared.path))
    train = ds["train"]
    assert train.column_names == ["input_ids", "position_ids"]
    ids, pos = np.array(train["input_ids"]), np.array(train["position_ids"])
    tok = AutoTokenizer.from_pretrained(str(prepared.path / "tokenizer"))
    eos = tok.eos_token_id
    # positions restart right after every EOS inside a block, and count up by one otherwise
    after_eos = np.zeros_like(ids, dtype=bool)
    after_eos[:, 1:] = ids[:, :-1] == eos
    assert (pos[after_eos] == 0).all()
    steps = np.diff(pos, axis=1)
    assert ((steps == 1) | (pos[:, 1:] == 0)).all()
    text = tok.decode(ids.ravel().tolist())
    assert "café au lait, déjà vu" in text and all(d in text for d in CJK_DOCS)
    assert report["splits"]["train"]["loss_share"] == 1.0


def test_packing_off_truncates_and_token_filters(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in [2] * 5 + [8] * 30 + [60] * 10]
    _write_jsonl(tmp_path / "train.jsonl", texts)
    recipe = load_recipe(
        _recipe(
            tmp_path, {"packing": False, "validation_split": 0.0, "clean": {"min_tokens": 3, "dedup": False}}
        )
    )
    report = data_stage.run(recipe).report
    train = report["splits"]["train"]
    assert report["dropped"] == {"too_few_tokens": 5}
    assert train["documents"] == 40 and train["truncated"] == 10 and train["truncation_rate"] == 0.25
    assert report["documents_kept"] == 40

    from datasets import load_from_disk

    rows = load_from_disk(str(recipe.data_output))["train"]["input_ids"]
    assert len(rows) == 40 and max(len(r) for r in rows) == 32 and min(len(r) for r in rows) < 32
    assert sum(len(r) for r in rows) == train["tokens"]


def test_cjk_trains_a_tokenizer_that_compresses_and_round_trips(tmp_path: Path) -> None:
    rng = random.Random(1)
    texts = [" ".join(rng.sample(CJK_DOCS, 3)) + f" {i}" for i in range(150)]
    _write_jsonl(tmp_path / "train.jsonl", texts)
    prepared = data_stage.run(
        load_recipe(_recipe(tmp_path, {"tokenizer": {"vocab_size": 600, "min_frequency": 2}}))
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared.path / "tokenizer"))
    sample = CJK_DOCS[0] + CJK_DOCS[1]
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample)  # fewer tokens than characters (and far fewer than UTF-8 bytes)


def test_num_proc_gives_the_same_dataset_and_is_not_in_the_fingerprint(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", toy_documents(600))  # 3 batches of documents: 2 workers
    path = _recipe(tmp_path, {"num_proc": 1})
    one = data_stage.run(load_recipe(path))
    from datasets import load_from_disk

    first = load_from_disk(str(one.path))["train"]["input_ids"]
    assert data_stage.run(load_recipe(path, ["data.num_proc=auto"])).reused
    again = data_stage.run(load_recipe(path, ["data.num_proc=2"]))
    assert again.reused  # worker count does not change the result, so it is not fingerprinted
    forced = data_stage.run(load_recipe(path, ["data.num_proc=2"]), force=True)
    assert forced.fingerprint == one.fingerprint
    assert load_from_disk(str(forced.path))["train"]["input_ids"] == first
    auto = data_stage.run(load_recipe(path, ["data.num_proc=auto"]), force=True)
    assert load_from_disk(str(auto.path))["train"]["input_ids"] == first
    changed = data_stage.run(load_recipe(path, ["data.clean.mask_urls=true"]))
    assert not changed.reused and changed.fingerprint != one.fingerprint


def test_num_proc_auto_uses_every_core_but_not_more_workers_than_batches(monkeypatch) -> None:
    import os

    from llmos_cli.core.data.encode import worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert worker_count("auto", 100_000) == 16
    assert worker_count("auto", 600) == 3  # 256 documents a batch
    assert worker_count("auto", 10) == 1 and worker_count(4, 0) == 1
    assert worker_count(2, 100_000) == 2


def test_bad_rows_fail_by_default_naming_lines_and_write_nothing(tmp_path: Path, run_cli) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n{nope\n{"text": "fine too"}\n[1]\n')
    res = run_cli("data", _recipe(tmp_path, {}))
    assert res.code == 2
    assert (
        "train.jsonl:2: invalid JSON" in res.stderr and "train.jsonl:4: expected a JSON object" in res.stderr
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "txt-folder"])
def test_other_input_kinds(tmp_path: Path, fmt: str) -> None:
    docs = toy_documents(60)
    if fmt == "csv":
        import csv

        with (tmp_path / "train.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text"])
            w.writerows([d] for d in docs)
        spec = "train.csv"
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp_path / "train.parquet")
        spec = "train.parquet"
    else:
        (tmp_path / "docs").mkdir()
        for i, d in enumerate(docs):
            (tmp_path / "docs" / f"{i:03d}.txt").write_text(d)
        spec = "docs"
    report = data_stage.run(load_recipe(_recipe(tmp_path, {"train": spec}))).report
    assert report["documents_read"] == 60 and report["documents_kept"] == 60


def test_reset_positions_flow_into_training(tiny_recipe, run_cli) -> None:
    """Packed documents keep their own positions through collate and training; their starts carry no loss."""
    from llmos_cli.core.train.batches import causal_lm_collate

    batch = causal_lm_collate(0)([{"input_ids": [5, 6, 1, 7, 8], "position_ids": [0, 1, 2, 0, 1]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and "attention_mask" not in batch
    assert batch["labels"].tolist() == [[-100, 6, 1, -100, 8]]
    res = run_cli(
        "--json",
        "pretrain",
        tiny_recipe,
        "--set",
        "data.packing_mode=reset_positions",
        "--set",
        "train.max_steps=10",
    )
    assert res.code == 0, res.stderr


def test_data_convert_cli(tmp_path, run_cli) -> None:
    import json

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    res = run_cli("--json", "data", "convert", src, tmp_path / "out.jsonl", "--to", "chat")
    assert res.code == 0, res.stderr
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["messages"][-1] == {"role": "assistant", "content": "hello"}


def test_switching_settings_back_reuses_a_kept_version(tmp_path: Path, monkeypatch) -> None:
    """data.output keeps earlier prepared versions by fingerprint: going back to a setting moves its
    version into place without encoding; at most data.keep_versions wait on the shelf."""
    from datasets import load_from_disk

    from llmos_cli.core.data import prepare as pipeline
    from llmos_cli.core.data.versions import versions_dir

    _write_jsonl(tmp_path / "train.jsonl", toy_documents(200))
    path = _recipe(tmp_path, {})
    short = data_stage.run(load_recipe(path))
    blocks = load_from_disk(str(short.path))["train"]["input_ids"]
    long = data_stage.run(load_recipe(path, ["data.max_seq_len=64"]))
    assert not long.reused and long.fingerprint != short.fingerprint

    encodes = []
    monkeypatch.setattr(pipeline, "encode_documents", lambda *a: encodes.append(a) or 0)
    back = data_stage.run(load_recipe(path, ["data.max_seq_len=32"]))
    assert back.reused and back.fingerprint == short.fingerprint and not encodes
    assert load_from_disk(str(back.path))["train"]["input_ids"] == blocks
    assert [p.name for p in versions_dir(back.path).iterdir()] == [long.fingerprint]
    monkeypatch.undo()

    for n in (40, 48, 56):
        data_stage.run(load_recipe(path, [f"data.max_seq_len={n}"]))
    assert len(list(versions_dir(back.path).iterdir())) == 2  # data.keep_versions
    data_stage.run(load_recipe(path, ["data.max_seq_len=24", "data.keep_versions=0"]))
    assert len(list(versions_dir(back.path).iterdir())) == 2  # the replaced version went, not shelved
