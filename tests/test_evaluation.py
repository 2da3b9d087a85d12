"""Metrics, teacher-forced sparse perplexity, predictor hits and the `train` command on tiny models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor, cli
from butler_cache.evaluation import predictor_hits, sparse_perplexity
from butler_cache.metrics import recall_at_k, token_hit_accuracy, topk_overlap
from butler_cache.training.data import TokenChunks

from .conftest import tiny_model


def test_topk_overlap_hand_computed():
    true = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5, 0.3]])
    pred = torch.tensor([[0.9, 0.0, 0.8, 0.1, 0.5, 0.3]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    # true top-3 {0, 1, 4}; predicted top-3 {0, 2, 4}: 2 of 3
    assert torch.allclose(token_hit_accuracy(true, pred, valid), torch.tensor([2 / 3], dtype=torch.float64))
    assert recall_at_k(true, pred, valid, 1).item() == 1.0
    assert recall_at_k(true, pred, valid, 100).item() == 1.0  # k capped by the context
    assert token_hit_accuracy(true, -true, valid).item() == 0.0
    valid[0, 0] = False  # true top-2 of {1..5} = {1, 4}, predicted = {2, 4}
    assert topk_overlap(true, pred, valid, k=2).item() == 0.5


def test_sparse_perplexity_at_zero_sparsity_is_dense():
    model = tiny_model("llama", seed=1)
    chunks = TokenChunks(torch.randint(2, 99, (3, 40), generator=torch.Generator().manual_seed(0)))
    nll = 0.0
    for i in range(3):
        ids = chunks[i]["input_ids"][None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
    dense = math.exp(nll / (3 * 39))
    assert math.isclose(sparse_perplexity(model, chunks, sparsity=0.0, progress=False), dense, rel_tol=1e-6)
    at_90 = sparse_perplexity(model, chunks, sparsity=0.9, progress=False)
    assert math.isfinite(at_90) and at_90 != dense
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    assert math.isfinite(sparse_perplexity(model, chunks, policy="butler", sparsity=0.5, predictor=predictor,
                                           progress=False))


def test_predictor_hits_ranges():
    model = tiny_model("qwen2", seed=1, num_attention_heads=6, num_key_value_heads=2)
    chunks = TokenChunks(torch.randint(2, 99, (2, 30), generator=torch.Generator().manual_seed(0)))
    predictor = ButlerPredictor(ButlerConfig.for_model(model))
    hits = predictor_hits(model, predictor, chunks, budgets=(4, 8), progress=False)
    assert set(hits) == {f"{g}/{m}" for g in ("per_kv_head", "per_query_head")
                         for m in ("token_hits", "recall@4", "recall@8")}
    assert all(0.0 <= v <= 1.0 for v in hits.values())


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (ids below the tiny models' vocabulary of 99)."""
    specials = ["[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    assert len(vocab) <= 99
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def test_train_command_writes_a_loadable_predictor(tmp_path, capsys):
    words = "the cat sat on a mat while the dog ran to the park and back again".split()
    text = " ".join(words[i % len(words)] for i in range(600))
    (tmp_path / "train.txt").write_text(text)
    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    _word_tokenizer(words).save_pretrained(tmp_path / "model")
    out = tmp_path / "predictor"
    code = cli.main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"), "--output",
                     str(out), "--seq-len", "32", "--steps", "3", "--layer-stride", "2", "--importance-dim", "8",
                     "--intermediate-size", "16", "--save-steps", "2", "--logging-steps", "1"])
    assert code == 0
    predictor = ButlerPredictor.from_pretrained(out)
    recipe = predictor.config.training
    assert recipe["steps_done"] == 3 and recipe["seq_len"] == 32 and recipe["command"].startswith("butler-cache")
    assert (out / "checkpoints" / "checkpoint-2" / "predictor" / "butler_config.json").is_file()
    ButlerCache.from_pretrained(out, model, token_budget=24)
    # and resumes from its last checkpoint
    code = cli.main(["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"), "--output",
                     str(out), "--seq-len", "32", "--steps", "4", "--layer-stride", "2", "--importance-dim", "8",
                     "--intermediate-size", "16", "--resume"])
    assert code == 0 and ButlerPredictor.from_pretrained(out).config.training["steps_done"] == 4
    # continues a trained predictor with a fresh schedule, recording what it continued
    base = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"), "--seq-len", "32",
            "--layer-stride", "2", "--importance-dim", "8", "--init-from", str(out)]
    start = ButlerPredictor.from_pretrained(out).state_dict()
    assert cli.main([*base, "--intermediate-size", "16", "--steps", "2", "--learning-rate", "0",
                     "--output", str(tmp_path / "continued")]) == 0
    continued = ButlerPredictor.from_pretrained(tmp_path / "continued")
    assert continued.config.training["continued_from"]["steps_done"] == 4
    for name, tensor in continued.state_dict().items():  # learning rate 0: the weights it started from
        assert torch.equal(tensor, start[name]), name
    capsys.readouterr()
    assert cli.main([*base, "--intermediate-size", "32", "--steps", "1", "--output", str(tmp_path / "bad")]) == 2
    assert "intermediate_size=16" in capsys.readouterr().err


def test_policy_hits_of_the_oracle_are_perfect_and_baselines_are_not():
    from butler_cache.evaluation import policy_hits

    model = tiny_model("llama", seed=1)
    chunks = TokenChunks(torch.randint(2, 99, (2, 40), generator=torch.Generator().manual_seed(0)))
    oracle = policy_hits(model, chunks, "oracle", budgets=(8,), progress=False)
    assert oracle == {"per_kv_head/token_hits": 1.0, "per_kv_head/recall@8": 1.0}
    for policy in ("streaming", "quest", "h2o", "snapkv", "random"):
        hits = policy_hits(model, chunks, policy, budgets=(8,), progress=False)
        assert 0.0 <= hits["per_kv_head/recall@8"] < 1.0, policy


def test_decode_perplexity_equals_teacher_forced_when_dense():
    """Token-by-token decoding through a full-budget cache gives the dense teacher-forced perplexity."""
    from transformers import DynamicCache

    from butler_cache.evaluation import decode_perplexity

    model = tiny_model("llama", seed=3, dtype=torch.float64)
    chunks = TokenChunks(torch.randint(1, 99, (2, 40), generator=torch.Generator().manual_seed(0)))
    dense = sparse_perplexity(model, chunks, sparsity=0.0, progress=False)
    by_decoding = decode_perplexity(model, chunks, lambda: DynamicCache(config=model.config), prefix=1, progress=False)
    full_budget = decode_perplexity(model, chunks, lambda: ButlerCache(model, token_budget=64), prefix=1, progress=False)
    # both score in float32 (cross-entropy of float32 logits)
    assert math.isclose(by_decoding, dense, rel_tol=1e-6) and math.isclose(full_budget, dense, rel_tol=1e-6)
    sparse = decode_perplexity(model, chunks, lambda: ButlerCache(model, token_budget=22, local_window=2), prefix=8,
                               progress=False)
    assert sparse != decode_perplexity(model, chunks, lambda: DynamicCache(config=model.config), prefix=8, progress=False)
