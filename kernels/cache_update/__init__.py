"""The cache update of a sparse layer's decode step: new K/V rows and their importance keys.

`naive.py` is the PyTorch reference (appended by concatenation); `cpu.py` the numba kernel that writes them into
the storages' spare rows in one call, tested against it.
"""

from .naive import append_and_project_naive

__all__ = ["append_and_project_naive"]
