"""`train_predictor`: the whole distillation recipe behind ``butler-cache train``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import ButlerConfig
from ..predictor import ButlerPredictor
from .memory import peak_rss_mb
from .mixture import build_mixture
from .module import DistillationModel
from .sources import DataSource


@dataclass
class TrainRecipe:
    """Everything ``butler-cache train`` accepts; recorded in the trained predictor's config."""

    data: list[str]
    output: str
    data_weights: list[float] | None = None  # one per source; None: each source in its natural proportion
    text_field: str = "text"
    model: str = "default"
    seq_len: int = 512
    steps: int = 300
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    loss: str = "kl"
    predictor_type: str = "strided"
    layer_stride: int = 4
    importance_dim: int = 16
    intermediate_size: int = 128
    attentive_hidden_size: int = 128
    attentive_num_heads: int = 4
    block_size: int = 128
    max_chunks: int | None = None
    save_steps: int = 100
    logging_steps: int = 10
    seed: int = 0
    resume: bool = False
    init_from: str | None = None
    max_minutes: float | None = None
    extra: dict = field(default_factory=dict)

    def sources(self) -> list[DataSource]:
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise ValueError(f"{len(self.data_weights)} data weights {self.data_weights} for {len(self.data)} sources "
                             f"{self.data}: give one weight per source")
        weights = self.data_weights or [None] * len(self.data)
        return [DataSource(path, weight=w, text_field=self.text_field) for path, w in zip(self.data, weights, strict=True)]

    def predictor_config(self, model) -> ButlerConfig:
        return ButlerConfig.for_model(
            model, predictor_type=self.predictor_type, layer_stride=self.layer_stride,
            importance_dim=self.importance_dim, intermediate_size=self.intermediate_size,
            attentive_hidden_size=self.attentive_hidden_size, attentive_num_heads=self.attentive_num_heads,
        )


def _initial_predictor(recipe: TrainRecipe, model) -> ButlerPredictor:
    """A fresh predictor, or (``recipe.init_from``) a trained one to continue from, checked against ``model``."""
    if recipe.init_from is None:
        return ButlerPredictor(recipe.predictor_config(model))
    predictor = ButlerPredictor.from_pretrained(recipe.init_from).train()
    predictor.check_compatible(model)
    wanted = recipe.predictor_config(model)
    for name in ("predictor_type", "layer_stride", "importance_dim", "intermediate_size"):
        if getattr(predictor.config, name) != getattr(wanted, name):
            raise ValueError(
                f"--init-from {recipe.init_from} holds a predictor with {name}={getattr(predictor.config, name)!r}, "
                f"but the recipe asks for {name}={getattr(wanted, name)!r}; pass the same sizes or drop --init-from"
            )
    return predictor


def train_predictor(recipe: TrainRecipe, model=None, tokenizer=None) -> ButlerPredictor:
    """Distil a predictor for ``model`` (loaded from ``recipe.model`` when not given) and save it to ``recipe.output``."""
    from transformers import Trainer, TrainingArguments

    from butler_cache.integrations import ButlerDistillationCallback

    from ..default_model import load_model

    if model is None:
        model, tokenizer = load_model(recipe.model)
    torch.manual_seed(recipe.seed)
    predictor = _initial_predictor(recipe, model)
    # the saved config records the whole history: this recipe plus the one it continued
    lineage = {"continued_from": predictor.config.training or {}} if recipe.init_from else {}
    predictor.config.training = {}
    mix = build_mixture(recipe.sources(), tokenizer, recipe.seq_len, total_rows=recipe.max_chunks, seed=recipe.seed)
    chunks = mix.chunks
    distil = DistillationModel(model, predictor, loss=recipe.loss, block_size=recipe.block_size)
    output = Path(recipe.output)
    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        max_steps=recipe.steps,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=int(recipe.warmup_ratio * recipe.steps),
        lr_scheduler_type="cosine",
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=2,
        seed=recipe.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(model=distil, args=args, train_dataset=chunks,
                      callbacks=[ButlerDistillationCallback(max_minutes=recipe.max_minutes)])
    # our on_log adds metrics to the logs: run it before the progress bar prints them
    trainer.callback_handler.callbacks.sort(key=lambda cb: not isinstance(cb, ButlerDistillationCallback))
    start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=True if recipe.resume else None)
    seconds = time.monotonic() - start
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h]
        predictor.config.training = {
            **{k: v for k, v in asdict(recipe).items() if k not in ("output", "resume", "extra")},
            **recipe.extra,
            **lineage,
            "steps_done": trainer.state.global_step,
            "train_seconds": round(seconds, 1),
            "train_chunks": len(chunks),
            "data_mix": mix.describe(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "final_loss": history[-1]["loss"] if history else result.training_loss,
            "final_metrics": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith(("token_hits", "recall@"))},
        }
        predictor.save_pretrained(output)
    return predictor
