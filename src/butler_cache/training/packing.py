"""Documents to fixed-length training sequences: tokenise with the model's tokenizer, then pack exactly.

Packing concatenates a source's documents, each followed by the tokenizer's EOS token, and cuts the
stream into rows of ``seq_len`` tokens. No token is dropped or repeated: the last row is filled with
padding that its attention mask marks as absent (the distillation loss skips masked keys and rows).
"""

from __future__ import annotations

import numpy as np
import torch


def tokenize_documents(documents, tokenizer, *, desc: str = "tokenising") -> np.ndarray:
    """All token ids of ``documents`` (a `datasets.Dataset` with a ``text`` column) as one flat int64 array.

    Each document is followed by the EOS token when the tokenizer has one; no other special tokens.
    The map runs through `datasets` (progress bar, and cached on disk for the next run).
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": [row + eos for row in ids["input_ids"]]}

    tokens = documents.map(encode, batched=True, remove_columns=documents.column_names, desc=desc)
    column = tokens.data.column("input_ids")  # pyarrow ChunkedArray of lists
    if len(column) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]).astype(np.int64)


def pack_tokens(ids: np.ndarray, seq_len: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [N, seq_len], attention_mask [N, seq_len])`` holding every id of ``ids`` once, in order.

    ``N = ceil(len(ids) / seq_len)``; the last row's tail is ``pad_token_id`` with mask 0.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"expected a non-empty 1-D token stream, got shape {ids.shape}")
    rows = -(-ids.size // seq_len)
    flat = np.full(rows * seq_len, pad_token_id, dtype=np.int64)
    flat[: ids.size] = ids
    mask = np.zeros(rows * seq_len, dtype=np.int64)
    mask[: ids.size] = 1
    return torch.from_numpy(flat).view(rows, seq_len), torch.from_numpy(mask).view(rows, seq_len)


def pad_token_id(tokenizer) -> int:
    """The id that fills a packed row's tail: the tokenizer's pad token, else its EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
