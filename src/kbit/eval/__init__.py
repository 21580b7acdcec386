"""Measuring models: reference text, perplexity and divergence between two models on the same tokens."""

from .compare import LogitComparison, compare_models, perplexity
from .text import reference_text

__all__ = ["LogitComparison", "compare_models", "perplexity", "reference_text"]
