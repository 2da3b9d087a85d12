"""Distillation of TokenButler predictors from a frozen model."""
