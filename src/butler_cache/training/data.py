"""Fixed-length token chunks (`TokenChunks`), the rows that training and evaluation iterate over."""

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
    """Rows of ``seq_len`` tokens; items are ``{"input_ids", "attention_mask"}``.

    ``attention_mask`` (``[N, seq_len]``, 1 = real token) marks a packed row's padded tail; all ones when
    not given.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"expected a non-empty [N, seq_len] tensor of token ids, got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
        self.input_ids, self.attention_mask = input_ids, attention_mask

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
        """Evaluation chunks from text files (joined by newlines) or any `sources.DataSource` path (a folder,
        glob, JSONL file, saved dataset or dataset id); whole chunks only, the tail is dropped."""
        from .sources import DataSource, load_documents

        sources = [source] if isinstance(source, str) else list(source)
        paths = [Path(s) for s in sources]
        if all(p.is_file() and p.suffix != ".jsonl" for p in paths):
            return cls.from_texts([p.read_text(encoding="utf-8") for p in paths], tokenizer, seq_len, max_chunks)
        texts: list[str] = []
        for s in sources:
            texts += load_documents(DataSource(s, text_field=text_column, split=split), tokenizer)["text"]
        return cls.from_texts(texts, tokenizer, seq_len, max_chunks)

    def evenly_spaced(self, n: int) -> TokenChunks:
        """At most ``n`` chunks spread evenly over this set, first and last included."""
        idx = torch.linspace(0, len(self) - 1, steps=min(n, len(self))).round().long()
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        return TokenChunks(self.input_ids[idx], mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        mask = torch.ones_like(ids) if self.attention_mask is None else self.attention_mask[i]
        return {"input_ids": ids, "attention_mask": mask}
