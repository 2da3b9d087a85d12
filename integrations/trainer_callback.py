"""`ButlerDistillationCallback`: what a stock `transformers.Trainer` needs to distil a predictor.

    model = DistillationModel(llm, ButlerPredictor(ButlerConfig.for_model(llm)))
    trainer = Trainer(model=model, args=args, train_dataset=chunks, callbacks=[ButlerDistillationCallback()])
    trainer.train()

The loss lives in `DistillationModel` (its forward returns ``{"loss": ...}``); the callback freezes
the base model, saves the predictor (never the LLM) at every checkpoint with ``save_pretrained``,
adds token-hit accuracy and recall@k (last query row, per KV head, this process's batches) and the
process's peak resident memory (``peak_rss_mb``) to the logs and ``state.log_history``, and stops cleanly on a non-finite loss or when a time budget runs
out. Callbacks run in order: put this one first (as ``butler-cache train`` does) for the progress
bar to print its metrics too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from butler_cache.training.memory import peak_rss_mb
from butler_cache.training.module import DistillationModel

logger = logging.get_logger(__name__)

PREDICTOR_SUBDIR = "predictor"


def _distillation_model(model) -> DistillationModel:
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    if not isinstance(model, DistillationModel):
        raise TypeError(f"ButlerDistillationCallback needs a DistillationModel, got {type(model).__name__}")
    return model


class ButlerDistillationCallback(TrainerCallback):
    """Freeze the LLM, save the predictor at checkpoints, log token hits / recall@k, stop cleanly.

    Parameters
    ----------
    max_minutes : stop (with a checkpoint) once training has run this long; None = no limit.
    """

    def __init__(self, max_minutes: float | None = None):
        self.max_minutes = max_minutes
        self._start = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        distil = _distillation_model(model)
        distil.teacher.requires_grad_(False).eval()
        trainable = sum(p.numel() for p in distil.parameters() if p.requires_grad)
        base = sum(p.numel() for p in distil.teacher.parameters())
        if state.is_world_process_zero:
            logger.warning(f"distilling a {distil.predictor.config.predictor_type} predictor: {trainable:,} trainable "
                           f"parameters ({trainable / base:.2%} of the {base:,}-parameter base model)")
        self._start = time.monotonic()

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, model=None, **kw):
        metrics = _distillation_model(model).pop_metrics()
        if metrics:
            metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if logs is not None:
            logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)
        if metrics and state.is_world_process_zero:
            logger.info(f"step {state.global_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kw):
        last = state.log_history[-1].get("loss") if state.log_history else None
        if last is not None and not math.isfinite(last):
            logger.error(f"loss became {last} at step {state.global_step}; stopping")
            control.should_training_stop = True
        if self.max_minutes is not None and time.monotonic() - self._start > 60 * self.max_minutes:
            logger.warning(f"time budget of {self.max_minutes} min reached at step {state.global_step}; saving and stopping")
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PREDICTOR_SUBDIR
            _distillation_model(model).predictor.save_pretrained(folder)
