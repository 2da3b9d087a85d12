"""Training-data sources: text files, folders, globs, JSONL and saved `datasets` datasets, as documents.

A source is read into a `datasets.Dataset` of documents, one row each, with a ``text`` column (plain
text) or a ``messages`` column (a chat, ``[{"role": ..., "content": ...}, ...]``, rendered later with the
model's chat template). What a source is follows from the path:

- a file ending in ``.jsonl``: one JSON object a line, the text under ``text_field`` (or a
  ``messages`` list);
- any other file: one document (the whole file, UTF-8);
- a folder saved by ``datasets.save_to_disk``: that dataset (its ``split`` if it is a ``DatasetDict``);
- any other folder: every file under it, sorted, each read as above;
- a glob (``*``, ``?``, ``[``): the files it matches, sorted;
- anything else that is not a path: a `datasets` Hub id (``datasets.load_dataset(id, split=split)``).

Every bad source fails here with a `DataSourceError` naming it: a missing path, a glob that matches
nothing, an empty file, bytes that are not UTF-8, a JSONL line without the text field.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

JSON_SUFFIXES = (".jsonl",)  # a `.json` file is a document (structured text), not rows
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
CHAT_FIELD = "messages"


class DataSourceError(ValueError):
    """A training-data source that cannot be read; the message names the source and what is wrong."""


@dataclass(frozen=True)
class DataSource:
    """One entry of a training mix: where the documents are and how much of the mix they make."""

    path: str
    weight: float | None = None  # share of the mix; None: the source's natural size
    text_field: str = "text"
    split: str = "train"

    def __post_init__(self):
        if self.weight is not None and not self.weight > 0:
            raise DataSourceError(f"source {self.path!r}: weight={self.weight!r} must be a positive number")


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _where(path: Path, source: str) -> str:
    """``source 'x'``, with the file inside it when the source is a folder or a glob."""
    return f"source {source!r}" + (f" (file {str(path)!r})" if str(path) != source else "")


def _check_text_file(path: Path, source: str) -> None:
    """Refuse an empty file or one whose bytes are not UTF-8, naming the file and the source it came from."""
    data = path.read_bytes()
    where = _where(path, source)
    if not data.strip():
        raise DataSourceError(f"{where} is empty: expected text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{where} is not UTF-8 text: byte {err.start} is {data[err.start:err.start + 1]!r} ({err.reason})"
        ) from None


def _check_jsonl(path: Path, source: str, text_field: str) -> None:
    """Every line a JSON object holding ``text_field`` (a string) or ``messages`` (a list); else name the line."""
    _check_text_file(path, source)
    where = _where(path, source)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{where}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataSourceError(f"{where}, line {number}: expected a JSON object, got {type(row).__name__}")
            if isinstance(row.get(text_field), str):
                continue
            if isinstance(row.get(CHAT_FIELD), list):
                continue
            raise DataSourceError(
                f"{where}, line {number}: no {text_field!r} string (nor a {CHAT_FIELD!r} list) in the object; "
                f"keys: {sorted(row)}"
            )


def _files_of(source: DataSource) -> list[Path] | None:
    """The files a path-like source names, sorted; None for a saved dataset or a Hub id."""
    if _is_glob(source.path):
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataSourceError(f"source {source.path!r}: the glob matches no file")
        return files
    path = Path(source.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataSourceError(f"source {source.path!r}: the folder holds no file")
        return files
    if path.exists() or "/" in source.path or path.suffix or source.path.startswith("."):
        raise DataSourceError(f"source {source.path!r}: no such file or folder")
    return None  # a Hub id


def render_chat(messages: list[dict], tokenizer, source: str) -> str:
    """One chat as text through the tokenizer's chat template (the roles and turn markers the model knows)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataSourceError(f"source {source!r} holds chats ({CHAT_FIELD!r}), but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _as_text(data, source: DataSource, tokenizer):
    """One ``text`` column: ``text_field`` as it is, or each ``messages`` chat rendered by the chat template."""
    columns = data.column_names
    has_text, has_chat = source.text_field in columns, CHAT_FIELD in columns
    if not (has_text or has_chat):
        raise DataSourceError(
            f"source {source.path!r} has no column {source.text_field!r} (nor {CHAT_FIELD!r}); columns: {columns}"
        )
    if len(data) == 0:
        raise DataSourceError(f"source {source.path!r} holds no document")
    if has_chat:
        field = source.text_field if has_text else None

        def render(batch):
            texts = batch[field] if field else [None] * len(batch[CHAT_FIELD])
            return {"text": [t if isinstance(t, str) else render_chat(m, tokenizer, source.path)
                             for t, m in zip(texts, batch[CHAT_FIELD], strict=True)]}

        return data.map(render, batched=True, remove_columns=columns, desc=f"chat template: {source.path}")
    if source.text_field != "text":
        data = data.rename_column(source.text_field, "text")
    return data.select_columns(["text"])


def load_documents(source: DataSource, tokenizer=None):
    """The documents of ``source`` as a `datasets.Dataset` with one ``text`` column.

    Chats (a ``messages`` list) are rendered with ``tokenizer``'s chat template.
    """
    import datasets

    files = _files_of(source)
    if files is None:
        path = Path(source.path)
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if source.split not in data:
                    raise DataSourceError(f"source {source.path!r} has no split {source.split!r}; splits: {list(data)}")
                data = data[source.split]
        else:
            try:
                data = datasets.load_dataset(source.path, split=source.split)
            except Exception as err:  # the Hub client's errors vary with the release; name the source
                raise DataSourceError(f"source {source.path!r}: not a file, folder or loadable dataset ({err})") from err
        return _as_text(data, source, tokenizer)

    json_files = [p for p in files if p.suffix in JSON_SUFFIXES]
    text_files = [p for p in files if p.suffix not in JSON_SUFFIXES]
    for p in json_files:
        _check_jsonl(p, source.path, source.text_field)
    for p in text_files:
        _check_text_file(p, source.path)
    parts = []
    if text_files:
        parts.append(datasets.load_dataset("text", data_files=[str(p) for p in text_files], sample_by="document",
                                           split="train"))
    if json_files:
        rows = datasets.load_dataset("json", data_files=[str(p) for p in json_files], split="train")
        parts.append(_as_text(rows, source, tokenizer))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
