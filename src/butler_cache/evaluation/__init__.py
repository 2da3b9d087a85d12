"""Evaluation protocols: teacher-forced sparse perplexity, token-hit accuracy and recall@k."""

from .hits import policy_hits, predictor_hits
from .perplexity import sparse_perplexity

__all__ = ["policy_hits", "predictor_hits", "sparse_perplexity"]
