"""The strided predictor's importance-query producer (LayerNorm, linear, SiLU, linear).

`naive.py` is the PyTorch reference (what `ImportanceQueryProducer` runs); `cpu.py` the numba kernel for the few
rows of a decode step, tested against it.
"""

from .naive import importance_queries_naive

__all__ = ["importance_queries_naive"]
