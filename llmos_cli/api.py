"""The Python API: `LLMOS` and `Model`, thin doors onto the same stages and core as the CLI.

from llmos_cli import LLMOS
llmos = LLMOS()
model = llmos.load_model("runs/my-run")
model.generate("def fib(n):", max_new_tokens=32)
model.predict("great phone, love it", labels=["positive", "negative"])
tuned = model.finetune(task="classification", train_data="train.jsonl", epochs=3)
model.translate("This is an example.", target_language="fr")
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from llmos_cli.core.models import ModelInfo
from llmos_cli.recipe import Recipe, apply_override, load_recipe, validate_recipe

LANGUAGES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ro": "Romanian",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ar": "Arabic",
}
DEFAULT_FORMAT = {"classification": "classification", "seq2seq": "pairs", "causal-lm": "instruction"}


class LLMOS:
    """Entry point: load models and run recipe stages, as the CLI does."""

    def __init__(self, home: str | Path | None = None):
        from llmos_cli.core.noise import quiet_known_noise

        quiet_known_noise()
        if home is not None:
            import os

            os.environ["LLMOS_HOME"] = str(home)

    def load_model(
        self,
        name_or_path: str | Path,
        *,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        device: str = "auto",
    ) -> Model:
        """A HF-format dir, a run dir (its final/), or a name registered in the model library; a local
        path wins over a registered name (the same rule as the CLI's MODEL). `device` follows the CLI's
        `--device` rule (auto: CUDA, then MPS, then CPU)."""
        return Model(
            name_or_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device
        )

    def recipe(self, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        return load_recipe(path, overrides)

    def data(self, recipe: str | Path | Recipe, overrides: list[str] | None = None) -> Any:
        from llmos_cli.stages import data

        return data.run(self._recipe(recipe, overrides))

    def pretrain(self, recipe: str | Path | Recipe, overrides: list[str] | None = None) -> dict[str, Any]:
        from llmos_cli.stages import pretrain

        return pretrain.run(self._recipe(recipe, overrides))

    def finetune(self, recipe: str | Path | Recipe, overrides: list[str] | None = None) -> dict[str, Any]:
        from llmos_cli.stages import finetune

        return finetune.run(self._recipe(recipe, overrides))

    def evaluate(self, recipe: str | Path | Recipe, overrides: list[str] | None = None) -> dict[str, Any]:
        from llmos_cli.stages import evaluate

        return evaluate.run(self._recipe(recipe, overrides))

    def run(
        self, recipe: str | Path, overrides: list[str] | None = None, *, force: bool = False
    ) -> dict[str, Any]:
        from llmos_cli.stages import pipeline

        return pipeline.run(Path(recipe), overrides or [], force=force)

    def models(self, kind: str | None = None) -> list[dict[str, Any]]:
        from llmos_cli.stages import models

        return models.list_models(kind)

    @staticmethod
    def _recipe(recipe: str | Path | Recipe, overrides: list[str] | None) -> Recipe:
        if isinstance(recipe, Recipe):
            if overrides:
                raise ValueError("overrides apply to a recipe file; change the Recipe object instead")
            return recipe
        return load_recipe(recipe, overrides)


class Model:
    """A model on disk, described once (its kind, tokenizer, base); the weights load on first use."""

    def __init__(
        self,
        path: str | Path | ModelInfo,
        *,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        device: str = "auto",
    ):
        from llmos_cli.core.models import describe_model
        from llmos_cli.core.runtime import pick_device

        self.info = (
            path if isinstance(path, ModelInfo) else describe_model(path, trust_remote_code=trust_remote_code)
        )
        self.path = self.info.path
        self.device = pick_device(device, key="device")
        self._load_kwargs = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r})"

    @cached_property
    def model(self) -> Any:
        from llmos_cli.core.runtime import inference_dtype

        return self.info.load(
            device=self.device,
            dtype=inference_dtype(self.device, config=self.info.config),
            **self._load_kwargs,
        )

    @cached_property
    def tokenizer(self) -> Any:
        return self.info.load_tokenizer(self._load_kwargs["trust_remote_code"])

    @property
    def kind(self) -> str:
        """causal, seq2seq, encoder or classifier."""
        return self.info.kind

    @cached_property
    def _runner(self) -> Any:
        from llmos_cli.core.serve.runners import RUNNERS

        if not self.info.generates:
            raise ValueError(
                f"{self.path} is {self.kind} model; generation needs a causal LM or a seq2seq model"
            )
        return RUNNERS[self.kind](self.model, self.tokenizer)

    def generate(
        self,
        prompt: str | list[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        batch_size: int = 16,
    ) -> str | list[str]:
        """Complete one prompt (returns a str) or a list of prompts (batched; returns a list)."""
        from llmos_cli.core.serve.runners import SamplingParams

        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=tuple(stop or ()),
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        done = [c.text for c in self._runner.generate(prompts, params, batch_size=batch_size)]
        return done[0] if isinstance(prompt, str) else done

    def scores(
        self,
        text: str | list[str],
        labels: list[str] | None = None,
        *,
        template: str | None = None,
        batch_size: int = 16,
    ) -> dict[str, float] | list[dict[str, float]]:
        """Label -> score for `text` (or for each text of a list, `batch_size` per forward pass): the fine-tuned
        head's probabilities, or zero-shot scores when `labels` are given."""
        texts = [text] if isinstance(text, str) else list(text)
        if labels is None:
            if self.kind != "classifier":
                raise ValueError("this model has no classification head: pass labels=[...] for zero-shot")
            from llmos_cli.core.serve.runners import EncoderRunner

            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1, got {batch_size}")
            runner = EncoderRunner(self.model, self.tokenizer)
            found = [
                s
                for i in range(0, len(texts), batch_size)
                for s in runner.classify(texts[i : i + batch_size])
            ]
        else:
            from llmos_cli.core.eval.zeroshot import zero_shot_batch

            found = zero_shot_batch(
                self.model, self.tokenizer, texts, labels, template=template, batch_size=batch_size
            )
        return found[0] if isinstance(text, str) else found

    def predict(
        self,
        text: str | list[str],
        labels: list[str] | None = None,
        *,
        template: str | None = None,
        batch_size: int = 16,
    ) -> str | list[str]:
        """The best label for `text` (or for each text of a list)."""
        texts = [text] if isinstance(text, str) else list(text)
        found = self.scores(texts, labels, template=template, batch_size=batch_size)
        best = [max(s.items(), key=lambda kv: kv[1])[0] for s in found]
        return best[0] if isinstance(text, str) else best

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised sentence embeddings."""
        from llmos_cli.core.serve.runners import embed

        return embed(self.model, self.tokenizer, texts).tolist()

    def label(
        self,
        data: str | Path,
        out: str | Path,
        labels: list[str] | None = None,
        *,
        text_field: str = "text",
        min_score: float | None = None,
        review: str | Path | None = None,
        template: str | None = None,
        batch_size: int = 16,
    ) -> dict[str, Any]:
        """Label every row of `data` into `out` as `llmos data label` does: `label` and `label_score`
        from `scores`; rows under `min_score` go to a review file. Returns the summary."""
        from dataclasses import asdict

        from llmos_cli.core.data.label import label_file

        result = label_file(
            self,
            data,
            Path(out),
            labels=labels,
            text_field=text_field,
            min_score=min_score,
            review=Path(review) if review else None,
            template=template,
            batch_size=batch_size,
        )
        return asdict(result)

    def translate(
        self, text: str, target_language: str, *, source_language: str = "en", max_new_tokens: int = 128
    ) -> str:
        """Translate with a seq2seq model, T5-style task prefix ("translate English to French: ...")."""
        if self.kind != "seq2seq":
            raise ValueError(
                f"translate needs an encoder-decoder (seq2seq) model; {self.path} is {self.kind}"
            )
        src = LANGUAGES.get(source_language, source_language)
        tgt = LANGUAGES.get(target_language, target_language)
        return self.generate(f"translate {src} to {tgt}: {text}", max_new_tokens=max_new_tokens)

    def finetune(
        self,
        *,
        task: str = "causal-lm",
        train_data: str | Path,
        validation_data: str | Path | None = None,
        method: str = "full",
        objective: str = "sft",
        epochs: float | None = None,
        max_steps: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        output_dir: str | Path | None = None,
        format: str | None = None,
        overrides: list[str] | None = None,
    ) -> Model:
        """Fine-tune this model through the same stage as `llmos finetune`; returns the fine-tuned model.
        `objective="dpo"` or `"orpo"` trains on preference pairs (format preference by default)."""
        from llmos_cli.stages import finetune

        name = f"{self.path.parent.name if self.path.name == 'final' else self.path.name}-{task if objective == 'sft' else objective}"
        train: dict[str, Any] = {
            k: v
            for k, v in {"epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size}.items()
            if v is not None
        }
        raw = {
            "run": {"name": name, "output_dir": str(output_dir or f"runs/{name}")},
            "task": task,
            "model": {"name_or_path": str(self.path), **self._load_kwargs},
            "data": {
                "train": str(Path(train_data).resolve()),
                "format": format
                or ("preference" if objective != "sft" else DEFAULT_FORMAT.get(task, "text")),
                **({"validation": str(Path(validation_data).resolve())} if validation_data else {}),
            },
            "finetune": {"method": method, "objective": objective},
            "train": train,
        }
        recipe = _with_overrides(raw, overrides or [])
        summary = finetune.run(recipe)
        return Model(Path(summary["final"]), device=str(self.device), **self._load_kwargs)

    def evaluate(
        self,
        data: str | Path,
        *,
        metrics: list[str] | None = None,
        task: str = "auto",
        output_dir: str | Path | None = None,
        overrides: list[str] | None = None,
    ) -> dict[str, Any]:
        """Evaluate this model through the same stage as `llmos eval`.

        Results go to `output_dir`, default `RUN/evals/<data name>/` for a run's model (the run's own
        eval.json, which its model card and `eval --compare` read, stays as `llmos eval` wrote it), else
        `runs/eval-<model>/`.
        """
        from llmos_cli.stages import evaluate

        in_run = self.path.name == "final"
        name = Path(data).stem
        out_dir = output_dir or (
            self.path.parent / "evals" / name if in_run else f"runs/eval-{self.path.name}"
        )
        raw = {
            "run": {"name": self.path.name, "output_dir": str(out_dir)},
            "model": {"name_or_path": str(self.path), **self._load_kwargs},
            "eval": {
                "data": str(Path(data).resolve()),
                "task": task,
                "device": str(self.device),
                **({"metrics": metrics} if metrics else {}),
            },
        }
        return evaluate.run(_with_overrides(raw, overrides or []))


def _with_overrides(raw: dict[str, Any], overrides: list[str]) -> Recipe:
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, "<api>")
