"""kiln.train: datasets, the model registry, the training loop, checkpoints, DDP and evaluation."""
