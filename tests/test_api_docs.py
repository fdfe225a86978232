"""Every Python block in docs/python-api.md runs, in order, against models this test builds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from tests.conftest import TINY_MODEL, toy_documents
from tests.finetune_fixtures import sentiment_rows, tiny_t5, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_python_api_doc_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in toy_documents(200)])
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96))
    recipe = {
        "run": {"name": "my-run", "output_dir": "runs/my-run"},
        "model": {"arch": "llama", "config": TINY_MODEL},
        "data": {
            "train": "corpus.jsonl",
            "tokenizer": {"vocab_size": 300},
            "max_seq_len": 32,
            "output": "runs/data/my-run",
        },
        "train": {"max_steps": 4, "batch_size": 8},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from llmos_cli import LLMOS

    LLMOS().pretrain("recipe.yaml")
    tiny_t5(tmp_path / "t5")
    shutil.move(tmp_path / "t5", tmp_path / "runs" / "t5-translate")

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    assert "causal" in printed and "'loss'" in printed and "my-run" in printed
    classifier = namespace["classifier"]
    assert classifier.path.resolve() == tmp_path / "runs" / "my-classifier" / "final"
    assert set(classifier.scores("the film was fine today")) == {"negative", "neutral", "positive"}
    assert len(namespace["vectors"]) == 2 and len(namespace["vectors"][0]) == 384
