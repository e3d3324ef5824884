"""Training with ``transformers.Trainer`` (pretraining, fine-tuning) and the crop loops of the generator and
its VAE (``loop`` holds what those two share). Above ``data``; beside ``pipelines``."""
