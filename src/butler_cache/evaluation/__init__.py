"""Evaluation protocols: teacher-forced sparse perplexity, token-hit accuracy and recall@k."""

from .hits import predictor_hits
from .perplexity import sparse_perplexity

__all__ = ["predictor_hits", "sparse_perplexity"]
