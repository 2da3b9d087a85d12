"""Tiny randomly initialised decoders of every supported family, and shared helpers."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

VOCAB = 99


def tiny_config(family: str, num_key_value_heads: int = 2, num_attention_heads: int = 4, num_layers: int = 4):
    """A transformers config of ``family`` in the size transformers' own tests use."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=8 * num_attention_heads,  # head_dim 8
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=37,
        max_position_embeddings=512,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=1,
        initializer_range=0.2,  # peaky attention, so that selections matter
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return Phi3Config(**common)
    if family == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=6, layer_types=types)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3")


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    torch.manual_seed(seed)
    config = tiny_config(family, **kwargs)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model


def random_batch(batch: int, length: int, pads: list[int] | None = None, seed: int = 0):
    """``(input_ids, attention_mask)`` with ``pads[i]`` left-padding tokens in row ``i``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads or [0] * batch):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@pytest.fixture
def llama():
    return tiny_model("llama")
