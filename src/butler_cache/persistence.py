"""Predictor files on disk and on the Hub: adapter-like, safetensors only.

A predictor folder holds ``butler_config.json``, ``butler_predictor.safetensors`` and a generated
``README.md`` model card. The names are our own (not PEFT's ``adapter_config.json``) because
transformers treats a folder with ``adapter_config.json`` as a PEFT adapter of its base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from .predictor import ButlerPredictor

PICKLED_WEIGHT_NAMES = ("butler_predictor.bin", "butler_predictor.pt", "pytorch_model.bin", "model.pt")


def library_version() -> str:
    from . import __version__

    return __version__


def save_predictor(predictor: ButlerPredictor, save_directory: str | Path) -> None:
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory={str(directory)!r} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    config = predictor.config
    config.library_version = library_version()
    config.to_json_file(directory / CONFIG_NAME)
    tensors = {name: t.detach().contiguous().cpu() for name, t in predictor.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "butler_cache"})
    (directory / "README.md").write_text(model_card(predictor))


def model_card(predictor: ButlerPredictor) -> str:
    config = predictor.config
    base = config.base_model_name_or_path
    shape = config.base_model
    front = ["---", "library_name: butler-cache", "tags:", "- butler-cache", "- tokenbutler", "- kv-cache", "- sparse-attention"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    n_params = predictor.num_parameters()
    lines = [
        *front,
        "",
        f"# TokenButler predictor for {base or shape.model_type}",
        "",
        "A token-importance predictor for [butler_cache](https://arxiv.org/abs/2503.07518): attach it to the",
        "base model to decode with query-aware top-k sparse attention over the full KV cache.",
        "",
        "```python",
        "from butler_cache import ButlerCache",
        "cache = ButlerCache.from_pretrained(\"<this repo or folder>\", model=model, token_budget=256)",
        "out = model.generate(**inputs, past_key_values=cache, max_new_tokens=200)",
        "```",
        "",
        "| field | value |",
        "|---|---|",
        f"| predictor type | {config.predictor_type} |",
        f"| parameters | {n_params:,} |",
        f"| base model shape | {shape.model_type}, {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_attention_heads} query / {shape.num_key_value_heads} KV heads, head_dim {shape.head_dim} |",
        f"| sparse layers | {len(config.sparse_layers)} (from layer {config.first_sparse_layer}) |",
        f"| layer stride / importance dim / MLP width | {config.layer_stride} / {config.importance_dim} / "
        f"{config.intermediate_size} |",
        f"| butler_cache version | {config.library_version} |",
    ]
    if config.training:
        lines += ["", "## Training", "", "```json", _json(config.training), "```"]
    return "\n".join(lines) + "\n"


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


def resolve_files(
    pretrained: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, Path]:
    """Local paths of (config, weights) for a folder or a Hub repository id.

    Hub downloads go through ``hf_hub_download``, which honours ``HF_HUB_OFFLINE`` and the local cache.
    """
    path = Path(pretrained)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {CONFIG_NAME}; is it a butler_cache predictor folder?")
        if not weights_path.is_file():
            pickled = [name for name in PICKLED_WEIGHT_NAMES if (path / name).exists()]
            if pickled:
                raise ValueError(
                    f"{str(path)!r} holds pickled weights {pickled}, which butler_cache refuses to load; "
                    f"expected {WEIGHTS_NAME} (safetensors)"
                )
            raise FileNotFoundError(f"{str(path)!r} has no {WEIGHTS_NAME}")
        return config_path, weights_path
    if path.exists():
        raise NotADirectoryError(f"{str(path)!r} is a file; expected a predictor folder or a Hub repository id")
    if str(pretrained).count("/") > 1 or str(pretrained).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no predictor folder at {str(pretrained)!r}")
    kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    try:
        config_path = hf_hub_download(str(pretrained), CONFIG_NAME, **kwargs)
        weights_path = hf_hub_download(str(pretrained), WEIGHTS_NAME, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as err:
        raise FileNotFoundError(
            f"could not get {CONFIG_NAME} and {WEIGHTS_NAME} of Hub repository {str(pretrained)!r} "
            f"(revision={revision!r}): {err}"
        ) from err
    return Path(config_path), Path(weights_path)


def load_weights(predictor: ButlerPredictor, weights_path: Path) -> None:
    """Load safetensors weights into ``predictor`` with errors that say what is wrong."""
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{str(weights_path)!r} is not a readable safetensors file ({err}); it may be truncated, corrupt "
            "or pickled, and butler_cache loads safetensors only"
        ) from err
    expected = predictor.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name}: file {tuple(state[name].shape)} vs config {tuple(t.shape)}"
        for name, t in expected.items()
        if name in state and state[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{str(weights_path)!r} does not match its {CONFIG_NAME}: missing={missing}, unexpected={unexpected}, "
            f"shape mismatches={wrong}"
        )
    with torch.no_grad():
        predictor.load_state_dict(state, strict=True)
