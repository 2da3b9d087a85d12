from .naive import sparse_attention_naive

__all__ = ["sparse_attention_naive"]
