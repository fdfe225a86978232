"""ONNX export of encoder-decoder LMs (T5) as three graphs, the layout onnxruntime-genai and optimum use:

- `encoder.onnx`: (input_ids, attention_mask) -> last_hidden_state
- `decoder.onnx`, the first step: (decoder_input_ids, encoder_attention_mask, encoder_hidden_states) ->
  logits, present.N.decoder.{key,value} (self-attention), present.N.encoder.{key,value} (cross-attention)
- `decoder_with_past.onnx`, each later step: (decoder_input_ids, encoder_attention_mask,
  past_key_values.N.{decoder,encoder}.{key,value}) -> logits, present.N.decoder.{key,value}; the
  cross-attention keys/values of the first step are fed to every step unchanged.

Exported with torch's TorchScript exporter (dynamo=False): the dynamo exporter fails on T5's relative
position buckets.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

GRAPHS = ("encoder", "decoder", "decoder_with_past")
_KINDS = ("decoder", "encoder")  # self-attention, cross-attention


def _flat(cache: Any) -> list[Any]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _pairs(flat: tuple[Any, ...]) -> list[tuple[Any, Any]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _modules(model: Any) -> dict[str, Any]:
    """The three graphs as torch modules over `model` (a T5ForConditionalGeneration)."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids: Any, encoder_attention_mask: Any, hidden: Any) -> Any:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.model(
                encoder_outputs=(hidden,),
                attention_mask=encoder_attention_mask,
                decoder_input_ids=decoder_input_ids,
                cache=cache,
                use_cache=True,
            )
            return out.logits, *_flat(out.cache.self_attention_cache), *_flat(out.cache.cross_attention_cache)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids: Any, encoder_attention_mask: Any, *past: Any) -> Any:
            n = len(past) // 2
            cache = EncoderDecoderCache(
                DynamicCache(ddp_cache_data=_pairs(past[:n]), config=self.model.config),
                DynamicCache(ddp_cache_data=_pairs(past[n:]), config=self.model.config),
            )
            # the cross-attention keys/values come from the cache; the hidden states only give the shape
            batch, length = encoder_attention_mask.shape
            hidden = past[n].new_zeros(batch, length, self.model.config.d_model)
            out = self.model(
                encoder_outputs=(hidden,),
                attention_mask=encoder_attention_mask,
                decoder_input_ids=decoder_input_ids,
                cache=cache,
                use_cache=True,
            )
            return out.logits, *_flat(out.cache.self_attention_cache)

    return {
        "encoder": Encoder().eval(),
        "decoder": Decoder().eval(),
        "decoder_with_past": DecoderWithPast().eval(),
    }


def _names(n_layers: int, prefix: str, kinds: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{kv}" for kind in kinds for i in range(n_layers) for kv in ("key", "value")]


def export_seq2seq_onnx(model: Any, dest: Path, quantize: bool = False) -> Path:
    """Write encoder.onnx, decoder.onnx and decoder_with_past.onnx to `dest` (int8 dynamic-quantised
    weights when `quantize`); return `dest`."""
    import torch

    model.eval()
    config, modules = model.config, _modules(model)
    n = config.num_decoder_layers or config.num_layers
    src = torch.randint(0, config.vocab_size, (2, 7))
    mask = torch.ones_like(src)
    start = torch.full((2, 1), config.decoder_start_token_id or 0, dtype=torch.int64)
    with torch.no_grad():
        hidden = modules["encoder"](src, mask)
        first = modules["decoder"](torch.cat([start, src[:, :2]], 1), mask, hidden)
    batch_src = {0: "batch", 1: "encoder_sequence"}
    batch_dec = {0: "batch", 1: "decoder_sequence"}
    self_past, cross_past = (
        _names(n, "past_key_values", ("decoder",)),
        _names(n, "past_key_values", ("encoder",)),
    )
    specs: dict[str, tuple[tuple[Any, ...], list[str], list[str], dict[str, Any]]] = {
        "encoder": (
            (src, mask),
            ["input_ids", "attention_mask"],
            ["last_hidden_state"],
            {"input_ids": batch_src, "attention_mask": batch_src, "last_hidden_state": batch_src},
        ),
        "decoder": (
            (torch.cat([start, src[:, :2]], 1), mask, hidden),
            ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states"],
            ["logits", *_names(n, "present", _KINDS)],
            {
                "decoder_input_ids": batch_dec,
                "encoder_attention_mask": batch_src,
                "encoder_hidden_states": batch_src,
                "logits": batch_dec,
                **{k: {0: "batch", 2: "decoder_sequence"} for k in _names(n, "present", ("decoder",))},
                **{k: {0: "batch", 2: "encoder_sequence"} for k in _names(n, "present", ("encoder",))},
            },
        ),
        "decoder_with_past": (
            (start, mask, *first[1:]),
            ["decoder_input_ids", "encoder_attention_mask", *self_past, *cross_past],
            ["logits", *_names(n, "present", ("decoder",))],
            {
                "decoder_input_ids": {0: "batch"},
                "encoder_attention_mask": batch_src,
                "logits": {0: "batch"},
                **{k: {0: "batch", 2: "past_decoder_sequence"} for k in self_past},
                **{k: {0: "batch", 2: "encoder_sequence"} for k in cross_past},
                **{k: {0: "batch", 2: "total_decoder_sequence"} for k in _names(n, "present", ("decoder",))},
            },
        ),
    }
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    for graph, (args, inputs, outputs, axes) in specs.items():
        path = dest / f"{graph}.onnx"
        fp32_path = dest / f"{graph}.fp32.onnx" if quantize else path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                modules[graph],
                args,
                str(fp32_path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                dynamo=False,
                opset_version=17,
            )
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(fp32_path),
                str(path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                extra_options={"MatMulConstBOnly": True},  # the weights; not attention's activation products
            )
            fp32_path.unlink()
    return dest


class Seq2SeqSession:
    """The three graphs in onnxruntime."""

    def __init__(self, directory: Path) -> None:
        import onnxruntime as ort

        opts = {"providers": ["CPUExecutionProvider"]}
        self.encoder, self.decoder, self.with_past = (
            ort.InferenceSession(str(directory / f"{g}.onnx"), **opts) for g in GRAPHS
        )

    def encode(self, ids: Any, mask: Any) -> Any:
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def first(self, decoder_ids: Any, mask: Any, hidden: Any) -> dict[str, Any]:
        names = [o.name for o in self.decoder.get_outputs()]
        feed = {
            "decoder_input_ids": decoder_ids,
            "encoder_attention_mask": mask,
            "encoder_hidden_states": hidden,
        }
        return dict(zip(names, self.decoder.run(None, feed), strict=True))

    def step(self, token: Any, mask: Any, past: dict[str, Any]) -> dict[str, Any]:
        names = [o.name for o in self.with_past.get_outputs()]
        feed = {"decoder_input_ids": token, "encoder_attention_mask": mask, **past}
        return dict(zip(names, self.with_past.run(None, feed), strict=True))


def seq2seq_greedy(
    session: Seq2SeqSession, prompt: list[int], new_tokens: int, start_id: int, eos_id: int | None
) -> list[int]:
    """Greedy decoding in onnxruntime with the KV cache: the encoder once, the first decoder step, then
    one token a step; stops after `eos_id` (included) as transformers' generate does."""
    import numpy as np

    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    out = session.first(np.array([[start_id]], dtype=np.int64), mask, session.encode(ids, mask))
    cross = {k.replace("present.", "past_key_values."): v for k, v in out.items() if ".encoder." in k}
    tokens: list[int] = []
    while True:
        tokens.append(int(out["logits"][0, -1].argmax()))
        if len(tokens) == new_tokens or tokens[-1] == eos_id:
            return tokens
        past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if ".decoder." in k}
        out = session.step(np.array([[tokens[-1]]], dtype=np.int64), mask, {**past, **cross})


def seq2seq_logits(directory: Path, prompts: list[list[int]], start_id: int) -> list[Any]:
    """Teacher-forced logits of the exported graphs, the way generation runs them: the prompt through
    the encoder, the start token through decoder.onnx, then each prompt token in turn through
    decoder_with_past.onnx with the presents fed back; (prompt length + 1, vocab) per prompt."""
    import numpy as np

    session, result = Seq2SeqSession(directory), []
    for prompt in prompts:
        ids = np.array([prompt], dtype=np.int64)
        mask = np.ones_like(ids)
        out = session.first(np.array([[start_id]], dtype=np.int64), mask, session.encode(ids, mask))
        cross = {k.replace("present.", "past_key_values."): v for k, v in out.items() if ".encoder." in k}
        steps = [out["logits"][0, -1]]
        for token in prompt:
            past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if ".decoder." in k}
            out = session.step(np.array([[token]], dtype=np.int64), mask, {**past, **cross})
            steps.append(out["logits"][0, -1])
        result.append(np.stack(steps))
    return result
