"""SPATIA models: configuration, modeling per scale (cell, niche, tissue, composite), heads, outputs, the
processor and token merging (transformers' configuration/modeling/processing split).

Importing this package is light; the modules import torch and transformers when they are imported.
Above ``utils`` and ``hub``; below ``data``.
"""
