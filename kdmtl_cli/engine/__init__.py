"""The thin engine: device and precision, the training loop, checkpoints, teacher cache."""
