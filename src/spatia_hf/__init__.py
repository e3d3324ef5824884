"""spatia-hf: SPATIA multi-scale multimodal models for image-based spatial transcriptomics.

Importing the package registers the SPATIA classes with transformers' Auto classes, so
``AutoModel.from_pretrained(path)`` works without ``trust_remote_code``.
"""

__version__ = "0.1.0"
