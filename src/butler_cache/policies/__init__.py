"""Selection policies: each one a small file that implements `SelectionPolicy.score`."""

from .base import POLICIES, ScoringInputs, SelectionPolicy, group_max_probabilities, make_policy, upcast
from .butler import ButlerPolicy
from .oracle import OraclePolicy

__all__ = [
    "POLICIES",
    "ButlerPolicy",
    "OraclePolicy",
    "ScoringInputs",
    "SelectionPolicy",
    "group_max_probabilities",
    "make_policy",
    "upcast",
]
