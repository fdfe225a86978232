"""`llmos export`: a model as HF (merged safetensors), ONNX, GGUF and/or Ollama (GGUF + Modelfile), each
checked against its source."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_cli.console import out as console
from llmos_cli.core.data.cache import replace_dir
from llmos_cli.core.export import gguf_check
from llmos_cli.core.export import verify as check
from llmos_cli.core.export.chat_format import chat_format
from llmos_cli.core.export.gguf import check_gguf_supported, export_gguf
from llmos_cli.core.export.gguf_quant import gguf_type
from llmos_cli.core.export.hf import export_hf, model_card, read_provenance
from llmos_cli.core.export.ollama import generation_defaults, modelfile
from llmos_cli.core.export.onnx import check_onnx_supported, export_onnx
from llmos_cli.core.export.onnx_seq2seq import export_seq2seq_onnx, seq2seq_greedy, seq2seq_logits
from llmos_cli.core.models import adapter_base, check_weights, describe_model, load_model
from llmos_cli.core.registry import register_run
from llmos_cli.core.train.adapters import adapter_quantization, save_adapter_quantization
from llmos_cli.core.writable import disk_full_is_clear, ensure_dir
from llmos_cli.errors import UserError

FORMATS = ("hf", "onnx", "gguf", "ollama")
GGUF_FORMATS = ("gguf", "ollama")


@dataclass
class Source:
    """The model being exported, and the logits every export is checked against."""

    dir: Path
    config: Any
    task: str
    tokenizer: Any
    prompts: list[list[int]]
    reference: check.Logits  # empty with --no-verify
    quantize: bool = False
    gguf_dtype: str = "f16"

    @property
    def name(self) -> str:
        return self.dir.parent.name if self.dir.name == "final" else self.dir.name

    def verified(
        self, fmt: str, precision: str, logits: Callable[[], check.Logits], **checks: Callable[[], bool]
    ) -> check.VerifyResult:
        """Compare the export's logits (computed only when verifying) with the reference."""
        if not self.reference:
            return check.skipped(fmt, precision)
        return check.compare(fmt, precision, self.reference, logits(), **{k: f() for k, f in checks.items()})


def run(
    model: str,
    formats: list[str],
    out: Path,
    *,
    verify: bool = True,
    quantize: bool = False,
    gguf_dtype: str = "f16",
    merge_lora: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Export MODEL (HF dir, run dir or LoRA adapter dir) in each format and check it against the source.

    One format is written to `out` itself; several go to `out/<format>/`. Each is built in a temp dir
    beside its target and renamed into place only when its check passed, so a failed export leaves no
    partial output (formats finished before it stay); a target that already holds an llmos export
    (a verify.json) is replaced. `quantize` makes the ONNX weights int8; `gguf_dtype` is one of
    gguf_quant.GGUF_TYPES (the K-quants need llama-cpp-python);
    `merge_lora=False` keeps a LoRA adapter as an adapter in the HF export (ONNX and GGUF always merge it).
    Raises UserError for unsupported combinations, VerificationFailed when logits differ beyond tolerance.
    """
    formats = _check_formats(formats, gguf_dtype)
    info = describe_model(model)
    model_dir, adapter, config = info.path, info.is_adapter, info.config
    check_weights(model_dir, allow_pickle)
    task = info.task or "other"  # causal-lm, classification, seq2seq; a bare encoder is "other"
    _check_supported(formats, config, task)
    targets = _targets(formats, Path(out))
    for target in targets.values():
        _check_target(target)

    console.info(f"loading {model_dir}")
    model_obj = info.load(allow_pickle=allow_pickle)
    tokenizer = info.load_tokenizer() if info.tokenizer_dir is not None else None
    prompts = check.encode_prompts(
        tokenizer, config.vocab_size, min(64, getattr(config, "max_position_embeddings", 64))
    )
    reference = check.torch_logits(model_obj, prompts) if verify else []  # a QLoRA base: in 4-bit
    quantization = adapter_quantization(model_dir) if adapter else None  # a QLoRA adapter's 4-bit base
    if quantization and merge_lora:
        model_obj = info.load(allow_pickle=allow_pickle, dequantize=True)  # merges into the 4-bit weights
    source = Source(model_dir, config, task, tokenizer, prompts, reference, quantize, gguf_dtype)
    provenance = read_provenance(
        model,
        model_dir,
        adapter_base(model_dir) if adapter else None,
        getattr(tokenizer, "chat_template", None),
    )

    keep_adapter = adapter and not merge_lora
    if keep_adapter and formats != ["hf"]:
        console.warn("ONNX and GGUF need the LoRA adapter merged into its base: merging it for them")
    # the kept adapter is exported first, because merging changes the base model in place
    ordered = sorted(formats, key=lambda f: f != "hf") if keep_adapter else formats
    results = []
    for fmt in ordered:
        if adapter and not (fmt == "hf" and keep_adapter) and hasattr(model_obj, "merge_and_unload"):
            model_obj = model_obj.merge_and_unload()
        console.info(f"exporting {fmt} to {targets[fmt]}")
        with _staging(targets[fmt]) as tmp:
            result = EXPORTERS[fmt](source, model_obj, tmp)
            result.write(tmp)
            if not result.ok:
                raise check.VerificationFailed(
                    f"{fmt} export does not match its source: max abs diff {_num(result.max_abs_diff)} "
                    f"(tolerance {_num(result.tolerance)}; checks: {result.checks or 'logits only'}); "
                    f"nothing was written to {targets[fmt]}"
                )
            if fmt == "hf" and keep_adapter and quantization:
                save_adapter_quantization(tmp, quantization)  # the kept adapter's base loads in 4-bit
            if fmt == "hf":
                card = model_card(
                    provenance, task, _asdict(result) if verify else None, merged=not keep_adapter
                )
                (tmp / "README.md").write_text(card)
            files = sorted(p.name for p in tmp.iterdir())
        results.append({"format": fmt, "path": str(targets[fmt]), "files": files, **_asdict(result)})
        name = model_dir.parent.name if model_dir.name == "final" else model_dir.name
        register_run(
            targets[fmt],
            name=f"{name}-{fmt}",
            kind="export",
            parent=str(model_dir),
            metrics={"max_abs_diff": result.max_abs_diff} if verify else None,
            suffix_clash=True,  # llmos names exports itself: another export of this model gets name-2
        )

    console.table(
        "export",
        ["format", "path", "precision", "max abs diff", "tolerance", "ok"],
        [
            [
                r["format"],
                r["path"],
                r["precision"],
                _num(r["max_abs_diff"]),
                _num(r["tolerance"]),
                "yes" if r["ok"] else "NO",
            ]
            for r in results
        ],
    )
    return {"model": str(model_dir), "task": task, "verified": verify, "exports": results}


def _to_hf(src: Source, model: Any, tmp: Path) -> check.VerifyResult:
    dtype = _saved_dtype(src.config)
    export_hf(model, src.tokenizer, tmp, dtype=dtype)
    precision = {"bfloat16": "bf16", "float16": "f16"}.get(str(dtype).removeprefix("torch."), "fp32")
    task = src.task if src.task != "other" else None
    return src.verified("hf", precision, lambda: check.torch_logits(load_model(tmp, task), src.prompts))


def _to_onnx(src: Source, model: Any, tmp: Path) -> check.VerifyResult:
    if src.task == "seq2seq":
        return _to_onnx_seq2seq(src, model, tmp)
    path = export_onnx(model, tmp, src.task, quantize=src.quantize)
    _save_config_and_tokenizer(src, model, tmp)
    pad_id = getattr(src.tokenizer, "pad_token_id", None) or getattr(src.config, "pad_token_id", None) or 0
    greedy = {}
    if src.task == "causal-lm" and not src.quantize:  # fp32: the KV-cache generation is token-exact
        greedy["greedy_with_kv_cache"] = lambda: _greedy_matches(src, model, path)
    return src.verified(
        "onnx",
        "int8" if src.quantize else "onnx-fp32",
        lambda: check.onnx_logits(path, src.prompts, pad_id, causal=src.task == "causal-lm"),
        **greedy,
    )


def _save_config_and_tokenizer(src: Source, model: Any, tmp: Path) -> None:
    """Beside ONNX graphs: the model's config and the tokenizer, so that the folder loads on its own."""
    model.config.save_pretrained(str(tmp))
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(str(tmp))


def _to_onnx_seq2seq(src: Source, model: Any, tmp: Path) -> check.VerifyResult:
    """encoder.onnx + decoder.onnx + decoder_with_past.onnx, checked through the KV-cache path."""
    export_seq2seq_onnx(model, tmp, quantize=src.quantize)
    _save_config_and_tokenizer(src, model, tmp)
    start = check.decoder_start_id(src.config)
    greedy = {}
    if not src.quantize:  # fp32: generation with the KV cache is token-exact
        greedy["greedy_with_kv_cache"] = lambda: _seq2seq_greedy_matches(src, model, tmp)
    return src.verified(
        "onnx",
        "int8" if src.quantize else "onnx-fp32",
        lambda: seq2seq_logits(tmp, src.prompts, start),
        **greedy,
    )


def _seq2seq_greedy_matches(src: Source, model: Any, directory: Path, new_tokens: int = 16) -> bool:
    """onnxruntime's greedy tokens with the KV cache equal transformers' generate for the first prompt."""
    import torch

    from llmos_cli.core.export.onnx_seq2seq import Seq2SeqSession

    prompt, config = src.prompts[0], src.config
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, num_beams=1
        )[0].tolist()[1:]
    got = seq2seq_greedy(
        Seq2SeqSession(directory), prompt, new_tokens, check.decoder_start_id(config), config.eos_token_id
    )
    return got == ref


def _greedy_matches(src: Source, model: Any, path: Path, new_tokens: int = 16) -> bool:
    """onnxruntime's greedy tokens with the KV cache equal transformers' for the first prompt."""
    import onnxruntime as ort

    from llmos_cli.core.export.onnx import onnx_greedy

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = src.prompts[0]
    limit = getattr(src.config, "max_position_embeddings", None) or getattr(
        src.config, "n_positions", 1 << 30
    )
    n = max(1, min(new_tokens, limit - len(prompt)))
    return onnx_greedy(session, prompt, n) == check.torch_greedy(model, prompt, n)


def _to_gguf(
    src: Source, model: Any, tmp: Path, fmt: str = "gguf", strict_chat: bool = False
) -> check.VerifyResult:
    """The GGUF file and its checks (gguf_check.verify_gguf)."""
    dtype = src.gguf_dtype
    chat = chat_format(src.tokenizer, strict=strict_chat)
    path = export_gguf(
        model, src.tokenizer, tmp / f"{src.name}-{dtype}.gguf", dtype=dtype, name=src.name, chat=chat
    )
    if not src.reference:
        return check.skipped(fmt, dtype)
    return gguf_check.verify_gguf(
        fmt, path, model.config, src.tokenizer, chat, src.prompts, src.reference, dtype
    )


def _to_ollama(src: Source, model: Any, tmp: Path) -> check.VerifyResult:
    """The GGUF plus a Modelfile whose TEMPLATE renders the tokenizer's chat template."""
    chat = chat_format(src.tokenizer, strict=True)
    if chat is None:
        raise UserError(
            "Ollama export needs a chat template (tokenizer_config.json chat_template)",
            hint="export as --format gguf for a plain completion model",
        )
    result = _to_gguf(src, model, tmp, fmt="ollama", strict_chat=True)
    gguf_file = next(tmp.glob("*.gguf"))
    context = getattr(src.config, "max_position_embeddings", None) or getattr(src.config, "n_positions", None)
    text = modelfile(
        gguf_file.name, chat, chat.stop_tokens(src.tokenizer), generation_defaults(src.dir, context)
    )
    (tmp / "Modelfile").write_text(text)
    return result


EXPORTERS: dict[str, Callable[[Source, Any, Path], check.VerifyResult]] = {
    "hf": _to_hf,
    "onnx": _to_onnx,
    "gguf": _to_gguf,
    "ollama": _to_ollama,
}


def _check_supported(formats: list[str], config: Any, task: str) -> None:
    if "onnx" in formats:
        check_onnx_supported(task, config)
    if any(f in GGUF_FORMATS for f in formats):
        check_gguf_supported(config)
        if task != "causal-lm":
            raise UserError(f"GGUF export needs a causal LM; this model is {task}")


def _targets(formats: list[str], out: Path) -> dict[str, Path]:
    """Where each format goes: `out` for one format, `out/<format>` for several; refuse to clobber."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a directory")
    targets = {fmt: out / fmt if len(formats) > 1 else out for fmt in formats}
    for target in targets.values():
        if target.is_file():
            raise UserError(f"{target} is a file; pass a directory to --out")
        if target.is_dir() and any(target.iterdir()) and not (target / "verify.json").exists():
            raise UserError(
                f"--out {target} already holds files that are not an llmos export",
                hint="pass a new or empty directory",
            )
    return targets


def _check_formats(formats: list[str], gguf_dtype: str) -> list[str]:
    chosen = list(dict.fromkeys(f.strip().lower() for f in formats))
    if not chosen:
        raise UserError(
            "no export format given", hint="pass --format hf, onnx, gguf or ollama (or set export.formats)"
        )
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    if any(f in GGUF_FORMATS for f in chosen):
        gguf_type(gguf_dtype)
    return chosen


def _saved_dtype(config: Any) -> Any:
    """The dtype the source stores its weights in (float32 unless it says bf16 or fp16)."""
    import torch

    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _check_target(target: Path) -> None:
    """The export target must be (or become) a folder in a writable place."""
    if target.exists() and not target.is_dir():
        raise UserError(f"--out: {target} is a file, not a folder", hint="choose another path")
    ensure_dir(target.parent, f"--out {target}")


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temp dir beside `target`, renamed to it on success and removed on failure."""
    _check_target(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with disk_full_is_clear(target):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def _asdict(result: check.VerifyResult) -> dict[str, Any]:
    return {
        "precision": result.precision,
        "max_abs_diff": result.max_abs_diff,
        "tolerance": result.tolerance,
        "ok": result.ok,
        "n_prompts": result.n_prompts,
        "checks": result.checks,
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
