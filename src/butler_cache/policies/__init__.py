"""Selection policies: each one a small file that implements `SelectionPolicy.score`."""

from .base import (
    POLICIES,
    ScoringInputs,
    SelectionPolicy,
    group_max_probabilities,
    make_policy,
    true_probabilities,
    upcast,
)
from .butler import ButlerPolicy
from .h2o import H2OPolicy
from .oracle import OraclePolicy
from .quest import QuestPolicy
from .random import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy

__all__ = [
    "POLICIES",
    "ButlerPolicy",
    "H2OPolicy",
    "QuestPolicy",
    "RandomPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "OraclePolicy",
    "ScoringInputs",
    "SelectionPolicy",
    "group_max_probabilities",
    "group_sum",
    "make_policy",
    "true_probabilities",
    "upcast",
]
