"""Helpers for testing code that talks to the Hugging Face Hub without the network.

``LoopbackHub`` (in ``hub_server``) serves the part of the Hub HTTP API that ``huggingface_hub``
uses to create repos, upload, list and download files, on 127.0.0.1; ``isolated_hf_home`` keeps a
test's Hub and ``datasets`` caches in a temporary folder.
"""

from .hub_server import LoopbackHub, isolated_hf_home

__all__ = ["LoopbackHub", "isolated_hf_home"]
