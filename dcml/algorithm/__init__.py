"""The algorithm: data, models, losses, samplers, clustering, metrics, the training loop."""
