"""The training-data pipeline: sources, exact packing, weighted mixing, reproducible order, bad sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Trainer, TrainingArguments

from butler_cache.integrations import ButlerDistillationCallback, DistillationModel
from butler_cache.training.mixture import build_mixture, default_total, mixture_counts
from butler_cache.training.packing import pack_tokens, tokenize_documents
from butler_cache.training.recipe import TrainRecipe, train_predictor
from butler_cache.training.sources import DataSource, DataSourceError, load_documents

from .scripts.distil_tiny import tiny_setup

EOS = 1


class CharTokenizer:
    """A character-level stand-in for a tokenizer: id = 2 + code point mod 97 (fits the tiny model's 99 ids)."""

    eos_token_id = EOS
    pad_token_id = 0
    chat_template = "{role}: {content}\n"

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False, verbose=True):
        return {"input_ids": [[2 + ord(c) % 97 for c in t] for t in texts]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(self.chat_template.format(**m) for m in messages)


def stream_of(texts: list[str]) -> list[int]:
    tok = CharTokenizer()
    return [i for t in texts for i in tok([t])["input_ids"][0] + [EOS]]


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# ------------------------------------------------------------------ sources


def test_sources_of_every_kind(tmp_path):
    import datasets

    tok = CharTokenizer()
    write(tmp_path / "one.txt", "plain text file")
    write(tmp_path / "folder" / "b.md", "second doc")
    write(tmp_path / "folder" / "a.json", '{"structured": true}')  # a .json file is a document, not rows
    write(tmp_path / "rows.jsonl", json.dumps({"text": "a row"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    datasets.Dataset.from_dict({"body": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "saved"))

    def texts(path, **kw):
        return load_documents(DataSource(str(path), **kw), tok)["text"]

    assert texts(tmp_path / "one.txt") == ["plain text file"]
    assert texts(tmp_path / "folder") == ['{"structured": true}', "second doc"]  # sorted by path
    assert texts(tmp_path / "folder" / "*.md") == ["second doc"]
    assert texts(tmp_path / "rows.jsonl") == ["a row", "user: hi\nassistant: hello\n"]  # chats via the template
    assert texts(tmp_path / "saved", text_field="body") == ["saved one", "saved two"]


@pytest.mark.parametrize("case", ["missing", "empty", "undecodable", "no_text_field", "not_json", "glob", "dir",
                                  "saved_column"])
def test_bad_sources_fail_naming_the_source(tmp_path, case):
    import datasets

    if case == "missing":
        path, match = tmp_path / "nope.txt", "no such file or folder"
    elif case == "empty":
        path, match = write(tmp_path / "empty.txt", "  \n"), "is empty"
    elif case == "undecodable":
        path, match = write(tmp_path / "latin1.txt", "caf\xe9 au lait".encode("latin-1")), "not UTF-8 text: byte 3"
    elif case == "no_text_field":
        path = write(tmp_path / "rows.jsonl", '{"text": "fine"}\n{"body": "no text here"}\n')
        match = "line 2: no 'text' string .* keys: \\['body'\\]"
    elif case == "not_json":
        path, match = write(tmp_path / "rows.jsonl", '{"text": "fine"}\n{oops\n'), "line 2: not JSON"
    elif case == "glob":
        path, match = tmp_path / "*.nothing", "the glob matches no file"
    elif case == "dir":
        (tmp_path / "hollow").mkdir()
        path, match = tmp_path / "hollow", "the folder holds no file"
    else:
        datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
        path, match = tmp_path / "saved", "has no column 'text' .*columns: \\['body'\\]"
    with pytest.raises(DataSourceError, match=match) as err:
        load_documents(DataSource(str(path)), CharTokenizer())
    assert str(path) in str(err.value)


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    write(tmp_path / "docs" / "good.txt", "fine")
    bad = write(tmp_path / "docs" / "bad.txt", b"\xff\xfe")
    with pytest.raises(DataSourceError, match="not UTF-8") as err:
        load_documents(DataSource(str(tmp_path / "docs")), CharTokenizer())
    assert str(tmp_path / "docs") in str(err.value) and str(bad) in str(err.value)


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(DataSourceError, match="weight=0"):
        DataSource("x.txt", weight=0)
    recipe = TrainRecipe(data=["a.txt", "b.txt"], output=str(tmp_path), data_weights=[1.0])
    with pytest.raises(ValueError, match=r"1 data weights \[1.0\] for 2 sources"):
        recipe.sources()


def test_chats_need_a_chat_template(tmp_path):
    tok = CharTokenizer()
    tok.chat_template = None
    path = write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataSourceError, match="no chat template"):
        load_documents(DataSource(str(path)), tok)


# ------------------------------------------------------------------ packing


@given(docs=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=8), seq_len=st.integers(2, 33))
@settings(max_examples=40, deadline=None)
def test_packing_keeps_every_token_once_in_order(docs, seq_len):
    stream = np.asarray(stream_of(docs))
    ids, mask = pack_tokens(stream, seq_len, pad_token_id=0)
    assert ids.shape == mask.shape == (-(-stream.size // seq_len), seq_len)
    assert ids[mask.bool()].tolist() == stream.tolist()
    assert mask.flatten().tolist() == [1] * stream.size + [0] * (ids.numel() - stream.size)  # padding at the end only


def test_tokenised_documents_end_with_eos(tmp_path):
    import datasets

    docs = datasets.Dataset.from_dict({"text": ["ab", "c"]})
    assert tokenize_documents(docs, CharTokenizer()).tolist() == stream_of(["ab", "c"])


# ------------------------------------------------------------------ mixing


@given(weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=6), total=st.integers(1, 5000))
def test_mixture_counts_follow_the_weights(weights, total):
    counts = mixture_counts(weights, total)
    exact = np.asarray(weights) / sum(weights) * total
    assert sum(counts) == total
    assert np.all(np.abs(np.asarray(counts) - exact) < 1)


@given(weights=st.lists(st.floats(0.05, 10), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_the_default_total_repeats_no_source(weights, seed):
    available = np.random.default_rng(seed).integers(1, 200, size=len(weights)).tolist()
    total = default_total(weights, available)
    assert all(c <= a for c, a in zip(mixture_counts(weights, total), available, strict=True))


def _three_sources(tmp_path):
    """Three sources whose characters never overlap, so that a row tells which source it came from."""
    alphabets = ["abc", "xyz", "0123"]
    sources = []
    for i, alphabet in enumerate(alphabets):
        rng = np.random.default_rng(i)
        for d in range(3 + 2 * i):
            text = "".join(rng.choice(list(alphabet), size=int(rng.integers(20, 90))))
            write(tmp_path / f"s{i}" / f"doc{d}.txt", text)
        sources.append(str(tmp_path / f"s{i}"))
    ids_of = [{2 + ord(c) % 97 for c in a} for a in alphabets]
    return sources, ids_of


def test_weights_are_respected_row_by_row(tmp_path):
    paths, ids_of = _three_sources(tmp_path)
    sources = [DataSource(p, weight=w) for p, w in zip(paths, [5, 3, 2], strict=True)]
    mix = build_mixture(sources, CharTokenizer(), 16, total_rows=100, seed=3)
    assert [r.rows_used for r in mix.report] == [50, 30, 20]
    assert np.bincount(mix.row_sources).tolist() == [50, 30, 20]
    for row, mask, src in zip(mix.chunks.input_ids, mix.chunks.attention_mask, mix.row_sources, strict=True):
        real = set(row[mask.bool()].tolist()) - {EOS}
        assert real and real <= ids_of[src]  # each row holds only its own source's tokens


def test_a_natural_mix_holds_every_packed_row_once(tmp_path):
    paths, _ = _three_sources(tmp_path)
    tok = CharTokenizer()
    mix = build_mixture([DataSource(p) for p in paths], tok, 16, seed=0)
    for i, path in enumerate(paths):
        docs = load_documents(DataSource(path), tok)
        expected, _ = pack_tokens(tokenize_documents(docs, tok), 16, 0)
        got = mix.chunks.input_ids[torch.from_numpy(mix.row_sources == i)]
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
        assert mix.report[i].rows_used == mix.report[i].rows_available == expected.shape[0]
        assert mix.report[i].tokens == sum(len(t) + 1 for t in docs["text"])


def test_the_same_seed_gives_the_same_order(tmp_path):
    paths, _ = _three_sources(tmp_path)
    sources = [DataSource(p, weight=1.0) for p in paths]
    first = build_mixture(sources, CharTokenizer(), 12, total_rows=40, seed=7)
    again = build_mixture(sources, CharTokenizer(), 12, total_rows=40, seed=7)
    other = build_mixture(sources, CharTokenizer(), 12, total_rows=40, seed=8)
    assert torch.equal(first.chunks.input_ids, again.chunks.input_ids)
    assert not torch.equal(first.chunks.input_ids, other.chunks.input_ids)


class RecordingDistillation(DistillationModel):
    seen: list[list[int]]

    def forward(self, input_ids, attention_mask=None):
        self.seen.extend(input_ids.tolist())
        return super().forward(input_ids, attention_mask)


def _recorded_run(out, data, steps, resume=False):
    model, predictor, _ = tiny_setup()
    distil = RecordingDistillation(model, predictor)
    distil.seen = []
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True,
                             seed=0, disable_tqdm=True)
    Trainer(model=distil, args=args, train_dataset=data, callbacks=[ButlerDistillationCallback()]).train(
        resume_from_checkpoint=True if resume else None)
    return distil.seen


def test_resume_sees_the_rows_of_an_uninterrupted_run(tmp_path):
    paths, _ = _three_sources(tmp_path)
    sources = [DataSource(p, weight=1.0) for p in paths]
    data = build_mixture(sources, CharTokenizer(), 12, total_rows=24, seed=0).chunks
    straight = _recorded_run(tmp_path / "straight", data, steps=6)
    first = _recorded_run(tmp_path / "resumed", data, steps=2)
    # a new process rebuilds the mix from the same sources and seed, then resumes
    data = build_mixture(sources, CharTokenizer(), 12, total_rows=24, seed=0).chunks
    rest = _recorded_run(tmp_path / "resumed", data, steps=6, resume=True)
    assert len(straight) == 12 and first + rest == straight


def test_the_recipe_records_the_mix(tmp_path):
    from butler_cache import ButlerPredictor

    paths, _ = _three_sources(tmp_path)
    recipe = TrainRecipe(data=paths, data_weights=[2.0, 1.0, 1.0], output=str(tmp_path / "out"), seq_len=12, steps=2,
                         max_chunks=8, save_steps=100, logging_steps=1, layer_stride=2, importance_dim=8,
                         intermediate_size=16)
    model, _, _ = tiny_setup()
    train_predictor(recipe, model=model, tokenizer=CharTokenizer())
    training = ButlerPredictor.from_pretrained(tmp_path / "out").config.training
    assert [m["rows_used"] for m in training["data_mix"]] == [4, 2, 2]
    assert [m["source"] for m in training["data_mix"]] == paths
    assert training["data_weights"] == [2.0, 1.0, 1.0] and training["peak_rss_mb"] > 0
