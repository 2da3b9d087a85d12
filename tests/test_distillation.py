"""Distillation: the streamed loss against its full-matrix reference, and training with a stock Trainer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from butler_cache import ButlerCache, ButlerPredictor
from butler_cache.integrations import PREDICTOR_SUBDIR, ButlerDistillationCallback, DistillationModel
from butler_cache.training.losses import distillation_loss, distillation_loss_naive

from .scripts.distil_tiny import tiny_setup

SCRIPT = Path(__file__).parent / "scripts" / "distil_tiny.py"


@given(
    B=st.integers(1, 2), H=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), T=st.integers(1, 19),
    student_heads=st.sampled_from(["kv", "query"]), loss=st.sampled_from(["kl", "mse"]),
    block=st.sampled_from([1, 4, 7, 128]), pad=st.integers(0, 4), seed=st.integers(0, 9999),
)
def test_streamed_loss_matches_naive(B, H, G, T, student_heads, loss, block, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    HQ, HS = H * G, (H if student_heads == "kv" else H * G)
    tq, tk = torch.randn(B, HQ, T, 8, generator=gen, dtype=torch.float64), torch.randn(B, H, T, 8, generator=gen, dtype=torch.float64)
    sq = torch.randn(B, HQ, T, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    sk = torch.randn(B, HS, T, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[-1, : min(pad, T - 1)] = False  # left padding in the last row
    kwargs = dict(teacher_scale=0.35, student_scale=0.5, key_padding=padding, loss=loss)
    total, count = distillation_loss(tq, tk, sq, sk, block_size=block, **kwargs)
    got = total / count
    (got_sq, got_sk) = torch.autograd.grad(got, (sq, sk))
    ref = distillation_loss_naive(tq, tk, sq, sk, **kwargs)
    (ref_sq, ref_sk) = torch.autograd.grad(ref, (sq, sk))
    # the streamed loss accumulates in float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_sq, ref_sq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_sk, ref_sk, rtol=1e-4, atol=1e-6)


def test_loss_rejects_bad_shapes():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="teacher_k has 3 heads"):
        distillation_loss(q, k, torch.randn(1, 4, 5, 2), torch.randn(1, 2, 5, 2), teacher_scale=1, student_scale=1)
    with pytest.raises(ValueError, match="loss='ce' is not known"):
        distillation_loss(q, q, q, q, teacher_scale=1, student_scale=1, loss="ce")


def _trainer(tmp_path, model, predictor, data, steps, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", logging_steps=1, report_to=[],
        remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True, **kwargs,
    )
    return Trainer(model=DistillationModel(model, predictor), args=args, train_dataset=data,
                   callbacks=[ButlerDistillationCallback()])


@pytest.mark.parametrize("predictor_type", ["strided", "attentive"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_a_few_steps_lower_the_loss(tmp_path, predictor_type, loss):
    model, predictor, data = tiny_setup()
    if predictor_type == "attentive":
        config = predictor.config
        config.predictor_type, config.attentive_hidden_size = "attentive", 16
        predictor = ButlerPredictor(config)
    distil = DistillationModel(model, predictor, loss=loss)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = distil(**batch)["loss"].item()
    trainer = _trainer(tmp_path, model, predictor, data, steps=25)
    trainer.model.loss_type = loss
    trainer.train()
    with torch.no_grad():
        after = distil(**batch)["loss"].item()
    assert after < 0.97 * before  # deterministic data and seed: a real decrease
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "token_hits" in logged[-1] and "recall@64" not in logged[-1]  # contexts are shorter than 64


def test_checkpoints_hold_the_predictor_not_the_llm(tmp_path):
    model, predictor, data = tiny_setup()
    _trainer(tmp_path, model, predictor, data, steps=2, save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    assert weights and all(name.startswith("predictor.") for name in weights)
    loaded = ButlerPredictor.from_pretrained(checkpoint / PREDICTOR_SUBDIR)
    torch.testing.assert_close(loaded.key_projections, predictor.key_projections)
    ButlerCache.from_pretrained(checkpoint / PREDICTOR_SUBDIR, model, token_budget=32)


def test_resume_continues_from_the_checkpoint(tmp_path):
    model, predictor, data = tiny_setup()
    _trainer(tmp_path / "straight", model, predictor, data, steps=4).train()
    straight = predictor.key_projections.detach().clone()
    model, predictor, data = tiny_setup()
    _trainer(tmp_path / "resumed", model, predictor, data, steps=2, save_steps=2).train()
    model, predictor, data = tiny_setup()  # a fresh process would start from scratch
    _trainer(tmp_path / "resumed", model, predictor, data, steps=4, save_steps=2).train(resume_from_checkpoint=True)
    torch.testing.assert_close(predictor.key_projections, straight, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate command not found")
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "--per-device-batch", "2"],
                   check=True, env=env, capture_output=True)
    # `--multi_gpu` makes accelerate start torchrun's processes; `use_cpu=True` in the script then runs
    # them as a MULTI_CPU (gloo) group. (`--cpu` would start a single process.)
    subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path / "two"),
                    "--per-device-batch", "1"], check=True, env=env, capture_output=True)
    state = (tmp_path / "two" / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"epoch": 0.5' in state  # 4 steps x 2 processes x 1 sample = half of the 16 samples
    one = ButlerPredictor.from_pretrained(tmp_path / "one" / "checkpoint-4" / PREDICTOR_SUBDIR)
    two = ButlerPredictor.from_pretrained(tmp_path / "two" / "checkpoint-4" / PREDICTOR_SUBDIR)
    initial = tiny_setup()[1]
    moved = (one.key_projections - initial.key_projections).abs().max()
    assert moved > 1e-3  # training did something
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
