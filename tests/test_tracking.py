"""train.log_to: MLflow against a local file store and W&B offline, read back after a tiny training.

Each test trains a tiny llama for a few steps and checks the tracker holds metrics.jsonl's loss series and the
train section as params; they skip where the tracker is not installed (both are dev extras)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, toy_documents, write_recipe


def train_with(tmp_path: Path, tracker: str) -> tuple[Path, list[dict]]:
    """A 6-step pretrain logging to `tracker`; returns the run dir and its metrics.jsonl rows."""
    from llmos_cli.api import LLMOS

    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in toy_documents(100))
    )
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        {
            "run": {"name": f"track-{tracker}", "output_dir": str(tmp_path / "run"), "seed": 0},
            "model": {"arch": "llama", "config": TINY_MODEL},
            "data": {
                "train": "corpus.jsonl",
                "validation_split": 0.1,
                "tokenizer": {"vocab_size": 300, "min_frequency": 1},
                "max_seq_len": 32,
                "output": str(tmp_path / "data"),
            },
            "train": {"max_steps": 6, "batch_size": 4, "log_every": 2, "eval_every": 3, "log_to": [tracker]},
        },
    )
    LLMOS().pretrain(recipe)
    run = tmp_path / "run"
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], split: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get("split", "train") == split]


def assert_same_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want] and want
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.slow
def test_mlflow_file_store_holds_the_loss_series_and_params(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()  # file:///...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    run_dir, rows = train_with(tmp_path, "mlflow")

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(experiment_ids=["0"])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"

    def history(name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))

    assert_same_series(history("train_loss"), series(rows, "train", "loss"))
    assert_same_series(history("validation_loss"), series(rows, "validation", "loss"))
    assert [step for step, _ in history("train_loss")] == [2, 4, 6]
    params = run.data.params
    assert params["max_steps"] == "6" and params["batch_size"] == "4" and params["log_to"] == "['mlflow']"


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (LevelDB's log format after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or a fragmented one's last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_the_loss_series_and_config(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, rows = train_with(tmp_path, "wandb")

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # beside the run's own files
    history: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, object] = {}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
    assert_same_series(history["train/loss"], series(rows, "train", "loss"))
    assert_same_series(history["validation/loss"], series(rows, "validation", "loss"))
    assert config["max_steps"] == 6 and config["batch_size"] == 4 and config["log_to"] == ["wandb"]


def test_a_tracker_refusing_its_settings_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: one message naming the key."""
    pytest.importorskip("mlflow")
    from llmos_cli.core.rundir import RunDir
    from llmos_cli.core.train.tracking import Trackers
    from llmos_cli.errors import UserError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError, match="train.log_to: mlflow could not start: MlflowException") as err:
        Trackers(["mlflow"], RunDir(tmp_path), {})
    assert "\n" not in err.value.message
