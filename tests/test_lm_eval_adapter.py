"""The lm-evaluation-harness adapter on a local task file (skipped without lm_eval)."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from butler_cache.integrations.lm_eval import ButlerLM  # noqa: E402

from .conftest import tiny_model  # noqa: E402
from .test_evaluation import _word_tokenizer  # noqa: E402

WORDS = "the cat sat on a mat dog ran to park where did go what is red blue green sky grass".split()


def _task(tmp_path):
    rows = [{"question": "the cat sat on the", "choices": ["mat", "sky", "park"], "answer": 0},
            {"question": "the dog ran to the", "choices": ["green", "park", "cat"], "answer": 1},
            {"question": "the sky is", "choices": ["blue", "mat", "dog"], "answer": 0},
            {"question": "the grass is", "choices": ["cat", "sat", "green"], "answer": 2}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "butler_local_mc.yaml").write_text(
        "task: butler_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path))


def _evaluate(lm, manager):
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=["butler_local_mc"], task_manager=manager, log_samples=True)
    return out["results"]["butler_local_mc"]["acc,none"], [s["resps"] for s in out["samples"]["butler_local_mc"]]


def test_adapter_runs_a_local_task_and_equals_hf_at_full_budget(tmp_path):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model("llama", seed=0), _word_tokenizer(WORDS)
    manager = _task(tmp_path)
    acc_hf, resps_hf = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2), manager)
    full = ButlerLM(pretrained=model, tokenizer=tokenizer, policy="oracle", budget_ratio=1.0, batch_size=2)
    acc_full, resps_full = _evaluate(full, manager)
    assert acc_full == acc_hf and resps_full == resps_hf
    sparse = ButlerLM(pretrained=model, tokenizer=tokenizer, policy="h2o", budget_ratio=0.5, sink_tokens=1,
                      local_window=1, batch_size=2)
    acc_sparse, _ = _evaluate(sparse, manager)
    assert 0.0 <= acc_sparse <= 1.0
    with pytest.raises(ValueError, match="budget_ratio=2.0"):
        ButlerLM(pretrained=model, tokenizer=tokenizer, policy="oracle", budget_ratio=2.0)
