"""Integrations with the transformers training stack: distil a predictor with a stock `Trainer`."""

from butler_cache.training.module import DistillationModel

from .trainer_callback import PREDICTOR_SUBDIR, ButlerDistillationCallback

__all__ = ["PREDICTOR_SUBDIR", "ButlerDistillationCallback", "DistillationModel"]
