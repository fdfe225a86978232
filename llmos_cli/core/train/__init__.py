"""The training loop and what it runs on: objectives, batches, checkpoints, adapters, early stopping."""
