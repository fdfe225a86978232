"""Fine-tuning tiny models end to end: LoRA and full, chat and instruction, classification, seq2seq."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmos_cli.core.train.adapters import apply_lora, auto_target_modules
from llmos_cli.errors import UserError
from llmos_cli.recipe import FinetuneSection, validate_recipe
from llmos_cli.stages import evaluate, finetune
from tests.finetune_fixtures import (
    chat_rows,
    instruction_rows,
    minilm_dir,
    pair_rows,
    sentiment_rows,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    write_jsonl,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"llama": tiny_llama(root / "llama"), "bert": tiny_bert(root / "bert"), "t5": tiny_t5(root / "t5")}


def recipe_for(tmp_path: Path, base: Path, rows: list[dict], **sections) -> object:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = sections.pop("data", {})
    # the fixtures sample a few examples over and over to learn them: repeats are the point here
    clean = {"dedup": False, "decontaminate": False, **settings.pop("clean", {})}
    body = {
        "run": {"name": "ft", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name_or_path": str(base)},
        "data": {
            "train": str(data),
            "validation_split": 0.1,
            "max_seq_len": 64,
            "output": str(tmp_path / "data"),
            "clean": clean,
            **settings,
        },
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 5, **sections.pop("train", {})},
        **sections,
    }
    return validate_recipe(body, str(tmp_path / "recipe.yaml"))


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def test_lora_trains_only_adapter_weights_and_loss_falls(tmp_path: Path, bases) -> None:
    base = bases["llama"]
    recipe = recipe_for(
        tmp_path,
        base,
        instruction_rows(200),
        data={"format": "instruction", "template": "Q: {prompt}\nA: "},
        finetune={"method": "lora", "lora": {"r": 8, "alpha": 64}},
        train={"eval_every": 15, "log_to": ["tensorboard"]},
    )
    summary = finetune.run(recipe)
    run = tmp_path / "run"
    losses = train_losses(run)
    assert losses[-1] < 0.4 * losses[0]
    assert summary["saved_as"] == "adapter" and summary["trainable_parameters"] < 0.25 * summary["parameters"]

    final = run / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert (
        config["base_model_name_or_path"] == str(base.resolve())
        and Path(config["base_model_name_or_path"]).is_absolute()
    )
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(t.abs().sum()) > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero
    assert (final / "tokenizer.json").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    from llmos_cli.core.models import load_model

    model = load_model(run)  # the adapter, loaded on its base by path
    original = load_file(str(base / "model.safetensors"))
    merged_state = model.get_base_model().state_dict()
    frozen = {k.replace("base_layer.", ""): v for k, v in merged_state.items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in original.items() if k in frozen)  # base untouched
    assert sum(k in frozen for k in original) >= len(original) - 1


def test_full_finetune_on_chat_data(tmp_path: Path, bases) -> None:
    recipe = recipe_for(
        tmp_path,
        bases["llama"],
        chat_rows(200),
        data={"format": "chat", "max_seq_len": 128},
        finetune={"gradient_checkpointing": True},
        train={"eval_every": 30, "lr": 3e-3},
    )
    summary = finetune.run(recipe)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0]
    assert summary["saved_as"] == "model" and summary["trainable_parameters"] == summary["parameters"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "final"
    AutoModelForCausalLM.from_pretrained(str(final))
    assert "im_start" in AutoTokenizer.from_pretrained(str(final)).chat_template


def test_chat_data_on_a_tokenizer_without_a_template_says_which_it_used(
    tmp_path: Path, bases, capsys
) -> None:
    from llmos_cli.stages import export

    base = tmp_path / "plain-base"
    shutil.copytree(bases["llama"], base)
    (base / "chat_template.jinja").unlink()  # a tokenizer without a chat template
    recipe = recipe_for(
        tmp_path, base, chat_rows(40), data={"format": "chat", "max_seq_len": 128}, train={"max_steps": 2}
    )
    capsys.readouterr()
    summary = finetune.run(recipe)
    said = " ".join(capsys.readouterr().err.split())
    assert "the tokenizer has no chat template: using llmos's default" in said
    assert summary["data"]["chat_template"] == "llmos default"
    export.run(str(tmp_path / "run"), ["hf"], tmp_path / "hf", verify=False)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Chat template" in card and "llmos's default chat template (the tokenizer had none)" in card


def test_classification_beats_the_majority_class(tmp_path: Path, bases) -> None:
    rows = sentiment_rows(480)
    recipe = recipe_for(
        tmp_path,
        bases["bert"],
        rows,
        task="classification",
        data={"format": "classification", "validation_split": 0.25},
        train={
            "max_steps": None,
            "epochs": 6,
            "lr": 3e-3,
            "batch_size": 16,
            "eval_every": 1000,
            "class_weights": "balanced",
        },
    )
    summary = finetune.run(recipe)
    majority = max(summary["data"]["class_counts"].values()) / summary["data"]["train"]["examples"]
    assert 0.4 < majority < 0.6
    assert summary["steps"] == 6 * (360 // 16) and summary["validation"]["accuracy"] > majority + 0.3
    assert summary["validation"]["f1"] > 0.7
    assert "perplexity" not in summary["validation"] and summary["validation"]["examples"] > 0

    from transformers import AutoModelForSequenceClassification

    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert AutoModelForSequenceClassification.from_pretrained(str(final)).config.num_labels == 3

    # `llmos eval` on the same recipe scores the same validation split through the model's head.
    recipe.eval.metrics = ["accuracy", "f1", "confusion_matrix", "loss"]
    result = evaluate.run(recipe)
    assert result["task"] == "classification" and result["n_examples"] == 120
    assert result["metrics"]["accuracy"] == pytest.approx(summary["validation"]["accuracy"])
    matrix = result["metrics"]["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == 120
    assert sum(matrix[i][i] for i in range(3)) / 120 == pytest.approx(result["metrics"]["accuracy"])
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 1000
    preds = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert len(preds) == 120 and abs(sum(preds[0]["scores"].values()) - 1) < 1e-5


def test_seq2seq_loss_falls_with_a_task_prefix(tmp_path: Path, bases) -> None:
    recipe = recipe_for(
        tmp_path,
        bases["t5"],
        pair_rows(200),
        task="seq2seq",
        data={"format": "pairs", "task_prefix": "translate English to French: "},
        finetune={"method": "lora", "lora": {"r": 8, "alpha": 32}},
        train={"lr": 2e-2, "eval_every": 30},
    )
    summary = finetune.run(recipe)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0] and summary["validation"]["loss"] < 0.5 * losses[0]
    assert summary["saved_as"] == "adapter"
    assert set(auto_target_modules(_t5(bases["t5"]))) == {"q", "k", "v", "o", "wi", "wo"}

    # Generation-based evaluation: prompt -> generate -> score, checked against sacrebleu directly.
    import sacrebleu

    recipe.eval.metrics = ["chrf", "exact_match"]
    recipe.eval.generation.max_new_tokens = 12
    result = evaluate.run(recipe)
    assert result["task"] == "generation" and result["n_examples"] == 20
    preds = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert preds[0]["prompt"].startswith("translate English to French: ")
    expected = sacrebleu.corpus_chrf(
        [p["prediction"] for p in preds], [[p["reference"] for p in preds]]
    ).score
    assert result["metrics"]["chrf"] == pytest.approx(expected)
    exact = sum(p["prediction"].strip() == p["reference"].strip() for p in preds) / len(preds)
    assert result["metrics"]["exact_match"] == pytest.approx(exact)


def _t5(path: Path):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(str(path))


def test_early_stopping_stops_and_final_keeps_the_best_weights(tmp_path: Path, bases) -> None:
    # Watching the loss with mode=max makes every evaluation after the first "worse": patience 2
    # at eval_every 2 must stop at step 6, and keep_best must bring back the step-2 weights.
    recipe = recipe_for(
        tmp_path,
        bases["llama"],
        instruction_rows(100),
        data={"format": "instruction", "template": "Q: {prompt}\nA: "},
        train={
            "max_steps": 40,
            "eval_every": 2,
            "log_every": 2,
            "keep_best": True,
            "early_stopping": {"metric": "loss", "mode": "max", "patience": 2},
        },
    )
    summary = finetune.run(recipe)
    assert summary["stopped_early"] and summary["steps"] == 6
    assert summary["best"]["step"] == 2 and summary["best"]["metric"] == "loss"
    run = tmp_path / "run"
    assert max(json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()) == 6
    assert (run / "checkpoints" / "step-6").is_dir()
    best = load_file(str(run / "checkpoints" / "best.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    last = load_file(str(run / "checkpoints" / "step-6" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[name], best[name]) and not torch.equal(final[name], last[name])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    at2 = {r.get("split", "train"): r for r in rows if r["step"] == 2}
    assert summary["validation"]["loss"] == at2["validation"]["loss"]  # the kept weights' numbers
    assert summary["train_loss"] == pytest.approx(at2["train"]["loss"], abs=1e-6)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"  # finetune runs plot their curves too

    again = finetune.run(recipe)  # resuming a stopped run does not train on
    assert again["steps"] == 6 and again["stopped_early"]


def test_base_can_be_a_run_directory_and_must_exist(tmp_path: Path, bases) -> None:
    shutil.copytree(bases["llama"], tmp_path / "run-a" / "final")
    assert (
        finetune.resolve_base(str(tmp_path / "run-a"), None).path.resolve()
        == (tmp_path / "run-a" / "final").resolve()
    )
    with pytest.raises(UserError, match="nope: not found .*, not a registered model"):
        finetune.resolve_base(str(tmp_path / "nope"), None)
    with pytest.raises(UserError, match="finetune needs a base model"):
        finetune.resolve_base(None, "r.yaml")


def test_auto_targets_per_architecture_and_dora(bases) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    llama = AutoModelForCausalLM.from_pretrained(str(bases["llama"]))
    assert auto_target_modules(llama) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    bert = AutoModelForSequenceClassification.from_pretrained(str(bases["bert"]), num_labels=2)
    assert auto_target_modules(bert) == ["dense", "key", "query", "value"]  # not the classifier head
    dora = apply_lora(llama, FinetuneSection(method="lora", dora=True), "causal-lm")
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)


def test_lora_classifier_is_saved_merged_with_its_label_map(tmp_path: Path) -> None:
    recipe = recipe_for(
        tmp_path,
        minilm_dir(),  # LoRA needs a pretrained base to adapt: the real MiniLM (22M parameters)
        sentiment_rows(256),
        task="classification",
        data={"format": "classification", "validation_split": 0.25, "max_seq_len": 16},
        finetune={"method": "lora", "lora": {"r": 8, "alpha": 16}},
        train={"max_steps": 24, "lr": 2e-3, "batch_size": 16, "eval_every": 100},
    )
    summary = finetune.run(recipe)
    assert summary["saved_as"] == "merged model"
    assert summary["trainable_parameters"] < 0.05 * summary["parameters"]
    assert summary["validation"]["accuracy"] > 0.75  # the majority class is 50%

    from transformers import AutoModelForSequenceClassification

    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_trackers_that_are_not_installed_are_a_clear_error(tmp_path: Path) -> None:
    import importlib.util

    from llmos_cli.core.rundir import RunDir
    from llmos_cli.core.train.tracking import Trackers

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    with pytest.raises(UserError, match="train.log_to: mlflow is not installed"):
        Trackers(["mlflow"], RunDir(tmp_path), {})


def test_a_second_finetune_on_unchanged_inputs_encodes_nothing(tmp_path: Path, bases, monkeypatch) -> None:
    from llmos_cli.core.data import formats

    encoded: list[int] = []
    real = formats._encode_all
    monkeypatch.setattr(
        formats, "_encode_all", lambda rows, enc: (encoded.append(len(rows)), real(rows, enc))[1]
    )
    rows = chat_rows(40)

    def tune(**data) -> dict:
        recipe = recipe_for(
            tmp_path,
            bases["llama"],
            rows,
            data={"format": "chat", **data},
            train={"max_steps": 2, "resume": "never"},
        )
        encoded.clear()
        return finetune.run(recipe)

    first = tune()
    assert encoded, "the first run encodes its data"
    again = tune()
    assert encoded == [] and again["data"]["fingerprint"] == first["data"]["fingerprint"]
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    changed = tune(chat_template=template)
    assert encoded and changed["data"]["fingerprint"] != first["data"]["fingerprint"]
    # the prepared tokenizer carries the template the data was encoded with, into final/
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())
    assert (
        saved.get("chat_template") == template
        or (tmp_path / "run" / "final" / "chat_template.jinja").read_text() == template
    )
    rows = chat_rows(41)  # a changed input file
    assert tune(chat_template=template) and encoded
    tuned = tune(chat_template=template)
    assert not encoded
    tok = tmp_path / "tok"  # a changed tokenizer (same vocabulary, another normalizer)
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bases["llama"] / name).exists():
            shutil.copy(bases["llama"] / name, tok / name)
    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    other = tune(chat_template=template)  # the same tokenizer again: cached
    assert not encoded and other["data"]["fingerprint"] == tuned["data"]["fingerprint"]
    recipe = recipe_for(
        tmp_path,
        bases["llama"],
        rows,
        model={"name_or_path": str(bases["llama"]), "tokenizer": str(tok)},
        data={"format": "chat", "chat_template": template},
        train={"max_steps": 2, "resume": "never"},
    )
    encoded.clear()
    assert finetune.run(recipe)["data"]["fingerprint"] != tuned["data"]["fingerprint"] and encoded


def test_a_finetune_without_validation_rows_trains_from_the_prepared_data(tmp_path: Path, bases) -> None:
    recipe = recipe_for(
        tmp_path,
        bases["llama"],
        instruction_rows(20),
        data={"format": "instruction", "template": "Q: {prompt}\nA: ", "validation_split": 0.0},
        train={"max_steps": 2},
    )
    summary = finetune.run(recipe)
    assert summary["steps"] == 2 and summary["validation"] is None
    assert summary["data"]["validation"]["examples"] == 0


def test_a_checkpoint_from_before_the_grouping_key_resumes_where_batches_still_group(tmp_path: Path) -> None:
    """Checkpoints saved before train.group_by_length grouped every unpacked batch: a classification run
    (still grouped) resumes from one, a chat run (now shuffled) is refused, naming the change."""
    from llmos_cli.core.train.checkpoint import check_compatible

    old = {"batch_size": 8, "data_fingerprint": "f"}
    check_compatible(old, {**old, "group_by_length": True}, tmp_path)
    with pytest.raises(UserError, match=r"group_by_length: True -> False"):
        check_compatible(old, {**old, "group_by_length": False}, tmp_path)
    check_compatible({"batch_size": 8}, {"batch_size": 8}, tmp_path)  # pretraining records no grouping


def test_length_grouping_is_for_classification_unless_the_recipe_says() -> None:
    from llmos_cli.core.train.batches import groups_by_length

    assert groups_by_length("auto", "classification")
    assert not groups_by_length("auto", "causal-lm") and not groups_by_length("auto", "seq2seq")
    assert groups_by_length(True, "causal-lm") and not groups_by_length(False, "classification")


def test_resuming_with_another_length_grouping_is_refused_naming_it(tmp_path: Path, bases) -> None:
    rows, data = instruction_rows(64), {"format": "instruction", "template": "Q: {prompt}\nA: "}
    finetune.run(recipe_for(tmp_path, bases["llama"], rows, data=data, train={"max_steps": 4}))
    grouped = {"max_steps": 8, "group_by_length": True}
    with pytest.raises(UserError, match=r"group_by_length: False -> True"):
        finetune.run(recipe_for(tmp_path, bases["llama"], rows, data=data, train=grouped))
