"""Distil a predictor for a tiny random Llama on synthetic tokens; run alone or under `accelerate launch`.

    python distil_tiny.py OUT --per-device-batch 2
    accelerate launch --multi_gpu --num_processes 2 distil_tiny.py OUT --per-device-batch 1   # CPU processes (gloo)
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from butler_cache import ButlerConfig, ButlerPredictor
from butler_cache.integrations import ButlerDistillationCallback, DistillationModel
from butler_cache.training.data import TokenChunks


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config).eval()
    predictor = ButlerPredictor(ButlerConfig.for_model(model, layer_stride=2, importance_dim=8, intermediate_size=16))
    ids = torch.randint(2, 99, (16, 24), generator=torch.Generator().manual_seed(seed))
    return model, predictor, TokenChunks(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model, predictor, data = tiny_setup()
    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        learning_rate=1e-2, lr_scheduler_type="constant", train_sampling_strategy="sequential", save_steps=args.steps,
        logging_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=DistillationModel(model, predictor), args=training_args, train_dataset=data,
                      callbacks=[ButlerDistillationCallback()])
    trainer.train()


if __name__ == "__main__":
    main()
