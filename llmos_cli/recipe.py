"""The recipe: YAML -> a typed, validated `Recipe`, with `extends:` inheritance and `--set` overrides."""

from __future__ import annotations

import difflib
import sysconfig
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmos_cli.errors import UserError

Task = Literal["causal-lm", "classification", "seq2seq"]
# What each task trains on: plain text (causal-lm only) or one of the task formats.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("instruction", "chat", "preference"),
    "classification": ("classification",),
    "seq2seq": ("pairs",),
}
# The validation metrics each task's training loop reports (what early stopping can watch).
VALIDATION_METRICS: dict[str, tuple[str, ...]] = {
    "causal-lm": ("loss", "perplexity"),
    "seq2seq": ("loss", "perplexity"),
    "classification": ("loss", "accuracy", "f1"),
}
# What a preference objective (finetune.objective dpo or orpo) adds to a causal LM's validation rows.
PREFERENCE_METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
BUILTIN_SOURCES = {"python-stdlib": lambda: sysconfig.get_paths()["stdlib"]}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RunSection(Section):
    name: str = "run"
    output_dir: str | None = Field(None, description="default runs/<name>, relative to the working directory")
    seed: int = 0


class ModelSection(Section):
    name_or_path: str | None = None
    arch: str = "llama"
    config: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


class CleanSection(Section):
    fix_mojibake: bool = Field(True, description="repair text decoded with the wrong encoding (ftfy)")
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    control_chars: bool = True
    whitespace: bool = True
    mask_urls: bool = False
    mask_emails: bool = False
    mask_phones: bool = False
    mask_ips: bool = Field(False, description="IPv4 and IPv6 addresses")
    mask_credit_cards: bool = Field(
        False, description="card numbers with an issuer prefix passing the Luhn check"
    )
    mask_ibans: bool = Field(False, description="IBANs passing the mod-97 check")
    url_token: str = "<URL>"
    email_token: str = "<EMAIL>"
    phone_token: str = "<PHONE>"
    ip_token: str = "<IP>"
    credit_card_token: str = "<CREDIT_CARD>"
    iban_token: str = "<IBAN>"
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    dedup: bool = True
    near_dedup: bool = Field(False, description="drop near-duplicates (MinHash-LSH over character n-grams)")
    near_dedup_threshold: float = Field(0.85, gt=0.0, lt=1.0, description="estimated Jaccard similarity")
    near_dedup_num_perm: int = Field(128, ge=16)
    near_dedup_ngram: int = Field(5, ge=1, description="characters per shingle (works for every script)")
    decontaminate: bool = Field(True, description="drop validation rows that also appear in train")


class TokenizerSection(Section):
    vocab_size: int = Field(8000, ge=300)
    min_frequency: int = Field(2, ge=1)


class ChecksSection(Section):
    """Data gates: limits on the data report; a failed one stops `llmos data` and `llmos run` (exit 3)."""

    min_rows: int | None = Field(None, ge=0, description="at least this many rows in the prepared dataset")
    max_duplicate_share: float | None = Field(None, ge=0, le=1, description="rows repeating an earlier row")
    max_truncated_share: float | None = Field(None, ge=0, le=1, description="rows cut at max_seq_len")
    max_train_validation_overlap: int | None = Field(None, ge=0, description="validation rows also in train")
    max_label_share: float | None = Field(None, ge=0, le=1, description="the most common label's share")
    max_dropped_share: float | None = Field(None, ge=0, le=1, description="rows dropped or malformed")


class LabelSection(Section):
    """A labelling step before task-format rows are encoded: the model's label goes into label_field."""

    model: str | None = Field(None, description="a model dir, run or registered name; unset: no step")
    labels: list[str] | None = Field(None, description="zero-shot labels; default a classifier's own")
    min_score: float | None = Field(None, description="rows scoring under this are left out")
    template: str | None = None
    batch_size: int = Field(16, ge=1, description="texts scored per forward pass")


class DataSection(Section):
    train: str | list[str] | None = None
    validation: str | list[str] | None = None
    validation_split: float = Field(0.05, ge=0.0, lt=1.0)
    format: Literal["text", "instruction", "chat", "classification", "pairs", "preference"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    label_field: str = "label"
    source_field: str = "source"
    target_field: str = "target"
    chosen_field: str = Field("chosen", description="preference: the preferred response (text or messages)")
    rejected_field: str = Field("rejected", description="preference: the dispreferred response")
    include: list[str] = Field(default_factory=list, description="glob patterns picking files in folders")
    text_unit: Literal["document", "line"] = "document"
    encoding: str = Field(
        "auto", description="auto: UTF-8, else each file's legacy encoding; or a codec name, strict"
    )
    max_documents: int | None = Field(None, ge=1)
    clean: CleanSection = Field(default_factory=CleanSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    max_seq_len: int = Field(512, ge=8)
    packing: Literal["auto"] | bool = Field(
        "auto",
        description="auto: text packs, examples do not; true: chat and instruction examples pack too "
        "(whole, positions restarting)",
    )
    packing_mode: Literal["concat", "reset_positions"] = Field(
        "concat", description="reset_positions: store position_ids restarting at each document in a block"
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="malformed rows: stop, or skip into a quarantine file"
    )
    num_proc: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="tokenising processes; auto: every core, at most one per 256 documents"
    )
    output: str | None = Field(None, description="default runs/data/<run.name>")
    keep_versions: int = Field(
        2,
        ge=0,
        description="earlier prepared versions kept beside data.output, reused when settings switch back",
    )
    checks: ChecksSection = Field(default_factory=ChecksSection)
    label: LabelSection = Field(default_factory=LabelSection)
    template: str | None = Field(
        None, description="instruction: prompt template with {prompt} and any row field, e.g. {input}"
    )
    chat_template: str | None = Field(None, description="chat: a Jinja template; default the tokenizer's")
    train_on_prompt: bool = Field(
        False, description="instruction/chat: put loss on prompts and user turns too"
    )
    label_names: list[str] | None = Field(
        None, description="classification: label order; default sorted labels"
    )
    task_prefix: str = Field(
        "", description="pairs: text put before every source, e.g. 'translate English to French: '"
    )
    max_target_len: int | None = Field(
        None, ge=1, description="pairs: target length cap; default max_seq_len"
    )

    @property
    def packs(self) -> bool:
        """Whether rows are packed into blocks: `auto` packs text only."""
        return self.format == "text" if self.packing == "auto" else self.packing

    @field_validator("encoding")
    @classmethod
    def _codec(cls, name: str) -> str:
        from llmos_cli.core.data.decode import check_encoding

        return check_encoding(name)


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: float = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "auto"


class DpoSection(Section):
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference")
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid: the share of flipped labels (cDPO)"
    )


class OrpoSection(Section):
    beta: float = Field(0.1, gt=0, description="the weight of the odds-ratio term beside the SFT loss")


class FinetuneSection(Section):
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="qlora: LoRA on a frozen 4-bit NF4 base (bitsandbytes: CUDA, or its CPU backend)"
    )
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="dpo and orpo train on data.format preference"
    )
    dpo: DpoSection = Field(default_factory=DpoSection)
    orpo: OrpoSection = Field(default_factory=OrpoSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    dora: bool = Field(False, description="lora: weight-decomposed LoRA (DoRA)")
    double_quant: bool = Field(
        True, description="qlora: quantise the 4-bit base's scales too (~0.4 bit/weight less)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )

    @model_validator(mode="before")
    @classmethod
    def _qlora_flag(cls, data: Any) -> Any:
        """The older spelling `qlora: true` (with method lora) is `method: qlora`."""
        if not isinstance(data, dict) or "qlora" not in data:
            return data
        data = dict(data)
        if data.pop("qlora") in (True, "true", "True", 1):
            if data.get("method", "lora") != "lora":
                raise RuleError(
                    "finetune.qlora",
                    "needs finetune.method=lora (a 4-bit model cannot be trained in full); "
                    "finetune.method: qlora says both",
                )
            data["method"] = "qlora"
        return data

    @property
    def qlora(self) -> bool:
        return self.method == "qlora"

    @property
    def adapters(self) -> bool:
        """LoRA adapters train on a frozen base (lora and qlora)."""
        return self.method in ("lora", "qlora")


class EarlyStoppingSection(Section):
    metric: str = Field("loss", description="a validation metric: loss, perplexity, accuracy, f1")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for loss/perplexity, else max")
    min_delta: float = Field(0.0, ge=0)


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup: float = Field(0.03, ge=0, description="a fraction of the steps if < 1, else a number of steps")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    compile: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=1)
    eval_batches: int | None = Field(None, ge=1, description="cap validation batches during training")
    save_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"
    num_workers: int = Field(0, ge=0)
    group_by_length: Literal["auto"] | bool = Field(
        "auto",
        description="finetune: batches of rows of similar length (less padding); auto: classification only",
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="under torchrun: auto/ddp replicate the model, fsdp shards it; see docs/distributed.md",
    )
    early_stopping: EarlyStoppingSection | None = None
    keep_best: bool = Field(
        False, description="final/ gets the weights of the best validation (early_stopping.metric)"
    )
    log_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="classification: 'balanced' (inverse class frequency) or one weight per label"
    )

    @property
    def length(self) -> str:
        """How long the run trains, in the recipe's own unit: '1000 steps' or '3 epochs'."""
        return f"{self.max_steps} steps" if self.max_steps else f"{self.epochs:g} epochs"

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 1000
        return self


InferencePrecision = Literal["auto", "fp32", "bf16", "fp16"]


class GenerationSection(Section):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)


class EvalSection(Section):
    task: Literal["auto", "perplexity", "multiple_choice", "generation", "classification", "preference"] = (
        "auto"
    )
    data: str | None = None
    metrics: list[str] = Field(default_factory=lambda: ["loss", "perplexity"])
    batch_size: int = Field(8, ge=1)
    batch_tokens: int | None = Field(
        None, ge=1, description="perplexity: padded tokens per forward; default batch_size x data.max_seq_len"
    )
    max_examples: int | None = Field(None, ge=1)
    target_delimiter: str = Field(
        " ", description="multiple_choice: what joins the context and each choice (lm-evaluation-harness's)"
    )
    generation: GenerationSection = Field(default_factory=GenerationSection)
    reference: str | None = Field(
        None,
        description="preference: the DPO reference model; default a LoRA run's base, else the starting model",
    )
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    precision: InferencePrecision = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU"
    )


class ServeLimits(Section):
    """Connection-level limits of `llmos serve`: what one client can hold or send."""

    max_body_bytes: int = Field(1 << 20, ge=1)
    max_header_bytes: int = Field(16 << 10, ge=1024)
    request_timeout_s: float = Field(30.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    shutdown_grace_s: float = Field(30.0, ge=0)


class ServeSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = "LLMOS_API_KEY"
    max_batch_size: int = Field(16, ge=1)
    max_queue: int = Field(256, ge=1)
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    precision: InferencePrecision = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU"
    )
    limits: ServeLimits = Field(default_factory=ServeLimits)


class ExportSection(Section):
    formats: list[Literal["hf", "onnx", "gguf", "ollama"]] = Field(default_factory=lambda: ["hf"])
    merge_lora: bool = True
    out: str | None = None


PipelineStage = Literal["data", "pretrain", "finetune", "eval", "export"]
PIPELINE_ORDER: tuple[str, ...] = ("data", "pretrain", "finetune", "eval", "export")


class PipelineSection(Section):
    stages: list[PipelineStage] = Field(default_factory=list, description="what `llmos run` chains, in order")

    @field_validator("stages")
    @classmethod
    def _order(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice: {stages}")
        if "pretrain" in stages and "finetune" in stages:
            raise ValueError("a pipeline trains once: list pretrain or finetune, not both")
        if stages != sorted(stages, key=PIPELINE_ORDER.index):
            raise ValueError(f"stages must follow the order {' -> '.join(PIPELINE_ORDER)}")
        return stages


class Recipe(Section):
    run: RunSection = Field(default_factory=RunSection)
    task: Task = "causal-lm"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    export: ExportSection = Field(default_factory=ExportSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    source: str | None = Field(None, exclude=True, description="the recipe file this came from")

    @model_validator(mode="after")
    def _cross_key_rules(self) -> Recipe:
        for rule in CROSS_KEY_RULES:
            rule(self)
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")

    @property
    def data_output(self) -> Path:
        return Path(self.data.output or f"runs/data/{self.run.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- rules that span several keys


PACKED_FORMATS = ("text", "chat", "instruction")


class RuleError(ValueError):
    """A recipe rule that spans several keys broken; `key` is the key the message is about."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _format_fits_task(r: Recipe) -> None:
    """A task format fits one task; plain text (the default) is checked by the stages that read it."""
    fmt, allowed = r.data.format, TASK_FORMATS[r.task]
    if fmt != "text" and fmt not in allowed:
        raise RuleError("data.format", f"'{fmt}' does not fit task '{r.task}' (use {' or '.join(allowed)})")


def _class_weights_need_classification(r: Recipe) -> None:
    if r.train.class_weights is not None and r.task != "classification":
        raise RuleError("train.class_weights", f"only classification uses class weights (task is '{r.task}')")


def _objective_fits_data(r: Recipe) -> None:
    """dpo and orpo train a causal LM on preference pairs, and preference pairs need one of them."""
    objective = r.finetune.objective
    if objective != "sft" and r.task != "causal-lm":
        raise RuleError("finetune.objective", f"'{objective}' trains causal LMs (task is '{r.task}')")
    if objective != "sft" and r.data.format != "preference":
        raise RuleError(
            "finetune.objective", f"'{objective}' trains on data.format preference (got '{r.data.format}')"
        )
    if objective == "sft" and r.data.format == "preference":
        raise RuleError("data.format", "preference pairs train with finetune.objective dpo or orpo (got sft)")


def _packing_fits_format(r: Recipe) -> None:
    """Packing joins causal-LM rows: text documents, chat and instruction examples."""
    if r.data.packing is True and r.data.format not in PACKED_FORMATS:
        raise RuleError(
            "data.packing",
            f"'{r.data.format}' rows are one example each (packing joins {', '.join(PACKED_FORMATS)} rows)",
        )


def _watched_metric_exists(r: Recipe) -> None:
    es, available = r.train.early_stopping, VALIDATION_METRICS[r.task]
    if r.finetune.objective != "sft":
        available = ("loss", *PREFERENCE_METRICS)
    if es is not None and es.metric not in available:
        raise RuleError(
            "train.early_stopping.metric",
            f"'{es.metric}' is not a validation metric of task {r.task} (available: {', '.join(available)})",
        )
    if (es is not None or r.train.keep_best) and not r.data.validation and r.data.validation_split == 0:
        key = "train.early_stopping" if es is not None else "train.keep_best"
        raise RuleError(key, "needs validation data: set data.validation, or data.validation_split above 0")


CROSS_KEY_RULES = (
    _format_fits_task,
    _class_weights_need_classification,
    _objective_fits_data,
    _watched_metric_exists,
    _packing_fits_format,
)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, follow `extends`, apply `--set` overrides, validate, resolve input paths."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a recipe file", hint=_recipes_inside(path))
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    raw, origins = _read_with_extends(path, chain=())
    for item in overrides or []:
        apply_override(raw, item, origins)
    recipe = validate_recipe(raw, str(path), origins)
    return _resolve_paths(recipe, path.parent)


def validate_recipe(raw: dict[str, Any], source: str, origins: dict[Any, Any] | None = None) -> Recipe:
    """Validate a raw recipe mapping; errors name the file (or `--set`) each bad key came from, per
    `origins` (see `_origin_tree`), else `source`."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_describe_validation_error(err, source, origins or {})) from None
    recipe.source = source
    return recipe


# An origin tree mirrors a raw recipe: each value is replaced by where it came from (a file name, or
# `--set KEY=VALUE`), and each mapping also holds its own origin under `_HERE`. Merging two origin
# trees with `deep_merge` makes the same choices as merging the recipes, so the winner's origin stays.
_HERE = object()


def _origin_tree(data: dict[str, Any], origin: str) -> dict[Any, Any]:
    tree: dict[Any, Any] = {
        k: _origin_tree(v, origin) if isinstance(v, dict) else origin for k, v in data.items()
    }
    tree[_HERE] = origin
    return tree


def _origin_of(origins: dict[Any, Any], loc: tuple[Any, ...]) -> str | None:
    """Where the value at `loc` (or its nearest enclosing key) came from."""
    node: Any = origins
    for part in loc:
        if not (isinstance(node, dict) and part in node):
            break
        node = node[part]
    return node.get(_HERE) if isinstance(node, dict) else node


def _not_a_recipe_file(path: Path) -> str | None:
    if path.is_dir():
        return f"{path} is a directory, not a recipe file"
    if not path.is_file():
        return f"file not found: {path}"
    return None


def _recipes_inside(path: Path) -> str:
    names = sorted(p.name for p in path.glob("*.y*ml"))
    if not names:
        return "give a recipe YAML file"
    return f"give one of its recipes, e.g. {path / names[0]}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[Any, Any]]:
    """The recipe at `path` merged over its `extends` parents, and its origin tree."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"{path}: extends forms a cycle: {cycle}")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    origins = _origin_tree(data, str(path))
    if parents is None:
        return data, origins
    merged: dict[str, Any] = {}
    merged_origins: dict[Any, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        if not isinstance(parent, str):
            raise UserError(f"{path}: extends: expected a file name or a list of them")
        parent_path = path.parent / parent
        problem = _not_a_recipe_file(parent_path.resolve())
        if problem:
            raise UserError(f"{path}: extends: {problem}")
        parent_data, parent_origins = _read_with_extends(parent_path, (*chain, resolved))
        merged = deep_merge(merged, parent_data)
        merged_origins = deep_merge(merged_origins, parent_origins)
    return deep_merge(merged, data), deep_merge(merged_origins, origins)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge `over` into a copy of `base`; mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], item: str, origins: dict[Any, Any] | None = None) -> None:
    """Set a dotted KEY=VALUE (the value parsed as YAML) in a raw recipe mapping; `origins`, if given,
    records that the value came from this `--set`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    if origins is not None:
        origin = f"--set {item}"
        for part in parts[:-1]:
            child_origins = origins.get(part)
            if not isinstance(child_origins, dict):
                child_origins = origins[part] = {_HERE: origin}
            origins = child_origins
        origins[parts[-1]] = _origin_tree(value, origin) if isinstance(value, dict) else origin


# pydantic tags each member of a union (`str | list[str]`) with its type; one line says them all.
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _union_errors_merged(errors: list[Any]) -> list[Any]:
    """Errors for the members of one union field become one: 'expected a string or a list of strings';
    where a member got further (a list with a bad element), only its deeper errors are kept."""
    groups: dict[tuple[Any, ...], list[tuple[str, Any]]] = {}
    merged: dict[tuple[Any, ...], Any] = {}
    for e in errors:
        loc = tuple(e["loc"])
        at = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
        if at is None:
            merged[loc] = e
        else:
            groups.setdefault(loc[:at], []).append((loc[at], {**e, "loc": loc[:at] + loc[at + 1 :]}))
    for prefix, members in groups.items():
        deeper = [e for _, e in members if len(e["loc"]) > len(prefix)]
        if deeper:
            merged.update((tuple(e["loc"]), e) for e in deeper)
        else:
            words = " or ".join(_type_word(tag) for tag, _ in members)
            merged[prefix] = {**members[0][1], "type": "union", "msg": f"expected {words}"}
    return list(merged.values())


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_WORDS or "[" in part)


def _type_word(tag: str) -> str:
    """pydantic's union tag in words: `list[float]` -> 'a list of numbers', `literal['a']` -> 'a'."""
    if tag.startswith("list[") and tag[5:-1] in _TYPE_WORDS:
        return (
            "a list of "
            + {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans"}[tag[5:-1]]
        )
    if tag.startswith("literal["):
        return tag[len("literal[") : -1].replace(",", " or")
    return _TYPE_WORDS.get(tag, tag)


def _describe_validation_error(err: ValidationError, source: str, origins: dict[Any, Any]) -> str:
    lines = []
    for e in _union_errors_merged(err.errors()):
        loc = ".".join(str(p) for p in e["loc"])
        where = _origin_of(origins, e["loc"]) or source
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: {loc}: unknown key{_did_you_mean(e['loc'])}")
        elif e["type"] == "model_type":  # a section given as a value: pydantic would name its class
            lines.append(f"{where}: {loc}: expected a mapping of {loc} settings, got {got!r}")
        elif e["type"] == "dict_type":
            lines.append(f"{where}: {loc}: expected a mapping, got {got!r}")
        elif isinstance(rule := e.get("ctx", {}).get("error"), RuleError):
            lines.append(str(rule))  # names its key; the stage that would refuse it says the same
        else:
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {loc}: {e['msg']}{shown}")
    if len(lines) == 1 and isinstance(err.errors()[0].get("ctx", {}).get("error"), RuleError):
        return lines[0]
    return "invalid recipe\n  " + "\n  ".join(lines)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        sections = [t for t in (ann, *get_args(ann)) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not sections:  # not a section, nor an optional one
            return ""
        model = sections[0]
    known = [k for k in model.model_fields if k != "source"]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys: {', '.join(known)})"


# ---------------------------------------------------------------- paths


def _resolve_input(value: str, base: Path) -> str:
    """Inputs are relative to the recipe file; `builtin:NAME` names a corpus every Python has and
    `hub:OWNER/NAME` a hub dataset (online only)."""
    if value.startswith("hub:"):
        return value
    if value.startswith("builtin:"):
        name = value.split(":", 1)[1]
        if name not in BUILTIN_SOURCES:
            raise UserError(f"unknown builtin source '{name}' (known: {', '.join(BUILTIN_SOURCES)})")
        return BUILTIN_SOURCES[name]()
    p = Path(value).expanduser()
    if p.is_absolute() or any(ch in value for ch in "*?["):
        return str(p if p.is_absolute() else base / p)
    return str(base / p)


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    d = recipe.data
    for key in ("train", "validation"):
        value = getattr(d, key)
        if isinstance(value, str):
            setattr(d, key, _resolve_input(value, base))
        elif isinstance(value, list):
            setattr(d, key, [_resolve_input(v, base) for v in value])
    if recipe.eval.data:
        recipe.eval.data = _resolve_input(recipe.eval.data, base)
    ref = recipe.eval.reference
    if ref and (base / ref).exists() and not Path(ref).is_absolute():
        recipe.eval.reference = str(base / ref)
    for key in ("name_or_path", "tokenizer"):
        value = getattr(recipe.model, key)
        if value and (base / value).exists() and not Path(value).is_absolute():
            setattr(recipe.model, key, str(base / value))
    return recipe
