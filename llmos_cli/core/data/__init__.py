"""The data pipeline's pieces: read, clean, dedup, tokenize, pack, split, store (no torch import)."""

IGNORE_INDEX = -100  # a label the loss skips (PyTorch cross_entropy's default ignore_index)
