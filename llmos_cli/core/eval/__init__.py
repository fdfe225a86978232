"""Evaluation: loss and perplexity, classification, multiple choice, zero-shot scoring, plots."""
