"""Training text as fixed-length token chunks: from text files, a saved `datasets` dataset, or the Hub."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens)."""
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # one long text on purpose: no length warning
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = limit
    return torch.tensor(ids, dtype=torch.long)


class TokenChunks(Dataset):
    """Consecutive, non-overlapping chunks of ``seq_len`` tokens; items are ``{"input_ids", "attention_mask"}``."""

    def __init__(self, input_ids: torch.Tensor):
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"expected a non-empty [N, seq_len] tensor of token ids, got shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids

    @classmethod
    def from_token_stream(cls, ids: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> TokenChunks:
        n = ids.numel() // seq_len
        if n == 0:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than one chunk of seq_len={seq_len}")
        if max_chunks is not None:
            n = min(n, max_chunks)
        return cls(ids[: n * seq_len].view(n, seq_len))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, seq_len: int, max_chunks: int | None = None) -> TokenChunks:
        return cls.from_token_stream(tokenize_text("\n".join(texts), tokenizer), seq_len, max_chunks)

    @classmethod
    def from_source(cls, source: str | Sequence[str], tokenizer, seq_len: int, *, max_chunks: int | None = None,
                    split: str = "train", text_column: str = "text") -> TokenChunks:
        """Text files (one or several paths), a folder saved by `datasets.save_to_disk`, or a `datasets` Hub id."""
        sources = [source] if isinstance(source, str) else list(source)
        paths = [Path(s) for s in sources]
        if all(p.is_file() for p in paths):
            return cls.from_texts([p.read_text(encoding="utf-8") for p in paths], tokenizer, seq_len, max_chunks)
        if len(sources) != 1:
            missing = [str(p) for p in paths if not p.is_file()]
            raise FileNotFoundError(f"not text files: {missing}")
        try:
            import datasets
        except ImportError as err:
            raise FileNotFoundError(
                f"{sources[0]!r} is not a text file, and reading `datasets` datasets needs `pip install datasets`"
            ) from err
        if paths[0].is_dir():
            data = datasets.load_from_disk(str(paths[0]))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(sources[0], split=split)
        if text_column not in data.column_names:
            raise ValueError(f"dataset {sources[0]!r} has no column {text_column!r}; columns: {data.column_names}")
        return cls.from_texts(list(data[text_column]), tokenizer, seq_len, max_chunks)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
