"""Evaluation protocols: teacher-forced and decode-mode sparse perplexity, token-hit accuracy and recall@k."""

from .hits import policy_hits, predictor_hits
from .perplexity import decode_perplexity, sparse_perplexity

__all__ = ["decode_perplexity", "policy_hits", "predictor_hits", "sparse_perplexity"]
