"""butler_cache: TokenButler sparse-attention decoding for Hugging Face transformers.

    cache = ButlerCache.from_pretrained(predictor_dir_or_hub_id, model=model, token_budget=256)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=200)
"""

__version__ = "0.1.0"

from .architecture import BaseModelShape, UnsupportedModelError
from .attention import ATTENTION_NAME, butler_attention_forward
from .attentive import AttentivePredictor
from .budget import TokenBudget
from .cache import ButlerCache, ButlerLayer, SparseAttentionSettings, StepStats
from .capture import AttentionCapture
from .config import ButlerConfig
from .default_model import default_predictor_path, load_default_model
from .hooks import attach, capture_attention, detach, is_attached
from .policies import POLICIES, SelectionPolicy, make_policy
from .predictor import ButlerPredictor
from .static import ButlerStaticCache
from .strided import StridedPredictor

__all__ = [
    "ATTENTION_NAME",
    "AttentivePredictor",
    "POLICIES",
    "BaseModelShape",
    "AttentionCapture",
    "ButlerCache",
    "ButlerConfig",
    "ButlerLayer",
    "ButlerPredictor",
    "ButlerStaticCache",
    "SelectionPolicy",
    "SparseAttentionSettings",
    "StepStats",
    "StridedPredictor",
    "TokenBudget",
    "UnsupportedModelError",
    "__version__",
    "attach",
    "butler_attention_forward",
    "capture_attention",
    "default_predictor_path",
    "detach",
    "is_attached",
    "load_default_model",
    "make_policy",
]
