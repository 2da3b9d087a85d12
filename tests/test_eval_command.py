"""`butler-cache eval` end to end on a tiny model, and the task generators' determinism."""

from __future__ import annotations

import json

import pytest

from butler_cache import cli
from butler_cache.evaluation.coref import make_coref_examples
from butler_cache.evaluation.longctx import TASKS, make_longctx_examples

from .conftest import tiny_model
from .test_evaluation import _word_tokenizer

WORDS = ("the grass is green sky blue sun yellow here we go there and back again pass key what remember it one of "
         "special magic numbers for number which variables are assigned value answer variable var").split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", seed=0).save_pretrained(folder)
    _word_tokenizer(WORDS + [str(d) for d in range(10)]).save_pretrained(folder)
    (folder / "text.txt").write_text(" ".join(WORDS * 40))
    return folder


def _run(model_dir, tmp_path, *args):
    out = tmp_path / "out.json"
    assert cli.main(["eval", *args, "--model", str(model_dir), "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    return json.loads(out.read_text())


def test_eval_perplexity(model_dir, tmp_path):
    report = _run(model_dir, tmp_path, "perplexity", "--policies", "dense,oracle,h2o,streaming", "--sparsity", "0.5,0.8",
                  "--text-file", str(model_dir / "text.txt"), "--seq-len", "64", "--max-tokens", "128")
    rows = report["results"]
    assert len(rows) == 8 and set(rows[0]) == {"policy", "sparsity", "perplexity", "chunks", "local_window"}
    assert {r["local_window"] for r in rows} == {1}  # the paper's protocol by default
    dense = {r["perplexity"] for r in rows if r["policy"] == "dense"}
    assert len(dense) == 1  # dense ignores the sparsity
    windowed = _run(model_dir, tmp_path, "perplexity", "--policies", "dense,oracle", "--sparsity", "0.8", "--local-window",
                    "8", "--text-file", str(model_dir / "text.txt"), "--seq-len", "64", "--max-tokens", "128")["results"]
    assert {r["local_window"] for r in windowed} == {8}
    by_policy = {(r["policy"], r["sparsity"]): r["perplexity"] for r in rows}
    assert windowed[0]["perplexity"] == by_policy[("dense", 0.8)]  # dense has no window to keep
    assert windowed[1]["perplexity"] != by_policy[("oracle", 0.8)]  # the window changes what the oracle keeps


def test_eval_hits_and_coref(model_dir, tmp_path):
    rows = _run(model_dir, tmp_path, "hits", "--policies", "oracle,quest", "--token-budget", "8,16",
                "--text-file", str(model_dir / "text.txt"), "--seq-len", "64", "--max-tokens", "64")["results"]
    assert [r["recall"] for r in rows if r["policy"] == "oracle"] == [1.0, 1.0]
    rows = _run(model_dir, tmp_path, "coref", "--policies", "dense,oracle", "--examples", "3")["results"]
    assert {"name_token_error", "examples_with_miss", "exact_match"} <= set(rows[0])


def test_eval_longctx(model_dir, tmp_path):
    rows = _run(model_dir, tmp_path, "longctx", "--policies", "oracle,snapkv", "--examples", "2", "--lengths", "64",
                "--token-budget", "24", "--tasks", "passkey")["results"]
    assert len(rows) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_generators_are_deterministic_and_varied(model_dir):
    a, b = make_coref_examples(200, seed=1), make_coref_examples(200, seed=1)
    assert a == b and len({ex.answer for ex in a}) == 200 and len({ex.context for ex in a}) == 200
    assert make_coref_examples(5, seed=2) != a[:5]
    for ex in a[:20]:
        assert ex.answer in ex.context.split("Question:")[0] and ex.answer not in ex.context.split("Question:")[1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for task in TASKS:
        first = make_longctx_examples(tokenizer, task, 300, 3, seed=5)
        assert first == make_longctx_examples(tokenizer, task, 300, 3, seed=5)
        assert len({ex.prompt for ex in first}) == 3
        n_tokens = len(tokenizer(first[0].prompt)["input_ids"])
        assert 200 <= n_tokens <= 340, (task, n_tokens)
        assert all(answer in first[0].prompt for answer in first[0].answers)


def test_real_text_haystacks(model_dir):
    """With a haystack, the prompt is one contiguous run of its lines with the needles between them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = [" ".join(WORDS[(i * 7) % len(WORDS):][:6]) + f" {i % 10}\n" for i in range(400)]
    haystack = "".join(lines)
    for task in TASKS:
        examples = make_longctx_examples(tokenizer, task, 300, 4, seed=3, haystack=haystack)
        assert examples == make_longctx_examples(tokenizer, task, 300, 4, seed=3, haystack=haystack)
        assert examples != make_longctx_examples(tokenizer, task, 300, 4, seed=3)  # not the filler
        for ex in examples:
            assert all(answer in ex.prompt for answer in ex.answers)
            body = ex.prompt.splitlines(keepends=True)[:-1]  # the question is the last line
            kept = [line for line in body if line in lines]
            assert len(body) - len(kept) == {"passkey": 1, "multikey_needle": 4, "variable_tracking": 4}[task]
            first = lines.index(kept[0])
            assert kept == lines[first : first + len(kept)]  # a contiguous window of the haystack
            assert 240 <= len(tokenizer(ex.prompt)["input_ids"]) <= 360, task
        assert len({ex.prompt.splitlines()[0] for ex in examples}) > 1  # windows start at different lines
    with pytest.raises(ValueError, match="fewer than the"):
        make_longctx_examples(tokenizer, "passkey", 5000, 1, haystack=haystack)


def test_shared_prefill_decodes_what_generate_decodes(model_dir):
    """One dense prefill copied into every cache gives each policy the answers of its own model.generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from butler_cache import ButlerConfig, ButlerPredictor
    from butler_cache.evaluation.runner import cache_factory, generate_answers, generate_answers_shared

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predictor = ButlerPredictor(ButlerConfig.for_model(model, layer_stride=2))
    prompts = [ex.prompt for ex in make_longctx_examples(tokenizer, "passkey", 90, 3, seed=2)]
    factories = {p: cache_factory(model, p, predictor=predictor, token_budget=24)
                 for p in ("dense", "oracle", "butler", "quest", "streaming", "h2o", "snapkv")}
    shared = generate_answers_shared(model, tokenizer, prompts, factories, max_new_tokens=6, progress=False)
    for name, make in factories.items():
        assert shared[name] == generate_answers(model, tokenizer, prompts, make, max_new_tokens=6, progress=False), name


def test_longctx_plot_at_one_length_draws_a_bar_per_policy_and_task():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from butler_cache.evaluation.commands import _longctx_bars

    rows = [{"policy": p, "task": t, "length": 64, "token_budget": 24, "accuracy": a}
            for p, t, a in (("dense", "passkey", 1.0), ("dense", "multikey_needle", 0.5), ("h2o", "passkey", 0.25))]
    fig, ax = plt.subplots()
    _longctx_bars(ax, rows)
    heights = [(round(bar.get_x() + bar.get_width() / 2, 2), bar.get_height()) for bar in ax.patches]
    plt.close(fig)
    # passkey bars left of each policy's tick, multikey right of it; h2o was not run on multikey: no bar
    assert heights == [(-0.2, 1.0), (0.8, 0.25), (0.2, 0.5)]
