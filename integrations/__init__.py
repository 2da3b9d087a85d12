"""Integrations with the transformers training stack (the distillation `TrainerCallback` lands with the training issue)."""
