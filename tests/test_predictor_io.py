"""Predictor persistence (folder, offline Hub cache) and the errors a user can run into."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor, TokenBudget, UnsupportedModelError
from butler_cache.compat import cache_argument

from .conftest import random_batch, tiny_model


@pytest.fixture
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture
def predictor(model):
    torch.manual_seed(0)
    return ButlerPredictor(ButlerConfig.for_model(model, layer_stride=2, importance_dim=8, intermediate_size=16))


@pytest.fixture
def saved(tmp_path, predictor):
    folder = tmp_path / "predictor"
    predictor.save_pretrained(folder)
    return folder


def test_round_trip(saved, predictor, model):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "butler_config.json", "butler_predictor.safetensors"]
    loaded = ButlerPredictor.from_pretrained(saved)
    assert loaded.config.to_dict() == predictor.config.to_dict()
    for (name, a), (_, b) in zip(predictor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    card = (saved / "README.md").read_text()
    assert "library_name: butler-cache" in card and "ButlerCache.from_pretrained" in card
    ids, mask = random_batch(2, 20, [0, 3])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    first = model.generate(**kwargs, **cache_argument(ButlerCache(model, predictor, token_budget=8, local_window=2)))
    again = model.generate(**kwargs, **cache_argument(ButlerCache.from_pretrained(saved, model, token_budget=8,
                                                                                 local_window=2)))
    assert torch.equal(first, again)


def _populate_hub_cache(cache_dir, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_from_offline_cache(tmp_path, saved, predictor, model, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _populate_hub_cache(tmp_path / "hub", "acme/butler-tiny", saved)
    cache = ButlerCache.from_pretrained("acme/butler-tiny", model, token_budget=32, cache_dir=tmp_path / "hub")
    assert torch.equal(cache.predictor.key_projections, predictor.key_projections)
    with pytest.raises(FileNotFoundError, match="acme/not-there"):
        ButlerPredictor.from_pretrained("acme/not-there", cache_dir=tmp_path / "hub")


def test_save_pretrained_can_push(tmp_path, predictor, monkeypatch):
    pushed = {}
    monkeypatch.setattr(ButlerPredictor, "push_to_hub", lambda self, repo_id, **kw: pushed.update(repo_id=repo_id, **kw))
    predictor.save_pretrained(tmp_path / "p", push_to_hub=True, repo_id="acme/p", private=True)
    assert pushed == {"repo_id": "acme/p", "private": True}


def test_wrong_model_shape_names_both(saved):
    other = tiny_model("qwen2", num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"model_type: predictor 'llama' vs model 'qwen2'.*num_attention_heads"):
        ButlerCache.from_pretrained(saved, other, token_budget=32)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="butler_config.json"):
        ButlerPredictor.from_pretrained(tmp_path)  # an empty folder
    (saved / "butler_predictor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="butler_predictor.safetensors"):
        ButlerPredictor.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="no predictor folder"):
        ButlerPredictor.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_pickled_weights_are_refused(saved, predictor):
    (saved / "butler_predictor.safetensors").unlink()
    torch.save(predictor.state_dict(), saved / "butler_predictor.bin")
    with pytest.raises(ValueError, match="pickled"):
        ButlerPredictor.from_pretrained(saved)
    # A pickle renamed to .safetensors is not unpickled either
    (saved / "butler_predictor.bin").rename(saved / "butler_predictor.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ButlerPredictor.from_pretrained(saved)


def test_corrupt_or_mismatched_weights(saved):
    weights = saved / "butler_predictor.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ButlerPredictor.from_pretrained(saved)
    config = json.loads((saved / "butler_config.json").read_text())
    config["importance_dim"] = 4
    (saved / "butler_config.json").write_text(json.dumps(config))
    weights.write_bytes(data)
    with pytest.raises(ValueError, match="shape mismatches"):
        ButlerPredictor.from_pretrained(saved)
    config["bogus"] = 1
    (saved / "butler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        ButlerPredictor.from_pretrained(saved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token_budget": 0}, "token_budget=0 must be a positive integer"),
        ({"token_budget": -5}, "token_budget=-5 must be a positive integer"),
        ({"token_budget": 2.5}, "token_budget=2.5 must be a positive integer"),
        ({"token_budget": 10}, "cannot hold sink_tokens=4 \\+ local_window=16"),
        ({"budget_ratio": 0.0}, "budget_ratio=0.0 must lie in \\(0, 1\\]"),
        ({"budget_ratio": 1.5}, "budget_ratio=1.5 must lie in \\(0, 1\\]"),
        ({"budget_ratio": -0.1}, "budget_ratio=-0.1 must lie in \\(0, 1\\]"),
        ({}, "give exactly one of token_budget and budget_ratio"),
        ({"token_budget": 64, "budget_ratio": 0.5}, "give exactly one"),
        ({"token_budget": 64, "local_window": 0}, "local_window=0"),
        ({"token_budget": 64, "sink_tokens": -1}, "sink_tokens=-1"),
    ],
)
def test_impossible_budgets(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ButlerCache(model, policy="oracle", **kwargs)


def test_bad_policy_and_backend(model):
    with pytest.raises(ValueError, match="policy 'butler' needs a predictor"):
        ButlerCache(model, policy="butler", token_budget=64)
    with pytest.raises(ValueError, match="policy='nope' is not known"):
        ButlerCache(model, policy="nope", token_budget=64)
    with pytest.raises(ValueError, match="backend='cuda' is not known"):
        ButlerCache(model, policy="oracle", token_budget=64, backend="cuda")


def test_models_whose_attention_cannot_be_hooked():
    bloom = BloomForCausalLM(BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM does not route its attention"):
        ButlerCache(bloom, policy="oracle", token_budget=64)
    with pytest.raises(UnsupportedModelError, match="expected a transformers model"):
        ButlerConfig.for_model(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError):
        ButlerCache(torch.nn.Linear(2, 2), policy="oracle", token_budget=64)


def test_config_validation(model):
    with pytest.raises(ValueError, match="layer_stride=0 must be a positive integer"):
        ButlerConfig.for_model(model, layer_stride=0)
    with pytest.raises(ValueError, match="first_sparse_layer=9"):
        ButlerConfig.for_model(model, first_sparse_layer=9)
    assert TokenBudget(token_budget=20).covers(20) and not TokenBudget(token_budget=20).covers(21)


