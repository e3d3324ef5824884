"""Readers per technology, the multi-scale builder, collators and the synthetic tissue."""

from .section import Section

__all__ = ["Section"]
