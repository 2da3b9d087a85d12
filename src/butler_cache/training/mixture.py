"""A weighted training mix of several sources, packed into sequences of one length, in a reproducible order.

Each source is read (`sources.load_documents`), tokenised and packed on its own (`packing`), so that
every row comes from one source. Row counts then follow the weights exactly (largest remainder), drawn
without repeats until a source runs out (then its rows are taken again, in a fresh order), and the rows
of all sources are shuffled together under ``seed``. The same sources, tokenizer, length and seed give
the same rows in the same order, in any process and after any resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import TokenChunks
from .packing import pack_tokens, pad_token_id, tokenize_documents
from .sources import DataSource, load_documents


@dataclass
class SourceReport:
    """What one source gave the mix; recorded in the trained predictor's config."""

    source: str
    weight: float  # as given, or the source's row count when no source has a weight
    share: float  # weight / sum of weights
    documents: int
    tokens: int
    rows_available: int
    rows_used: int

    @property
    def passes(self) -> float:
        return self.rows_used / self.rows_available


def mixture_counts(weights: Sequence[float], total: int) -> list[int]:
    """Rows per source for ``total`` rows: ``total * w / sum(w)`` rounded by largest remainder (sums to ``total``)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts.tolist()


def default_total(weights: Sequence[float], available: Sequence[int]) -> int:
    """The largest mix in which no source's rows repeat: ``min(available / share)``."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum()
    total = int(np.floor(np.min(np.asarray(available) / share) + 1e-9))
    while any(c > a for c, a in zip(mixture_counts(weights, total), available, strict=True)):
        total -= 1  # rounding gave a source one row more than it has
    return max(total, 1)


def draw_rows(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` row indices of ``range(available)``: a shuffled pass, then more passes if ``count`` needs them."""
    passes = [rng.permutation(available) for _ in range(-(-count // available))]
    return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)


@dataclass
class TrainingMix:
    """The packed rows of a mix (``chunks``) and what each source gave (``report``)."""

    chunks: TokenChunks
    report: list[SourceReport]
    row_sources: np.ndarray  # [N] index into ``report`` of each row's source

    def describe(self) -> list[dict]:
        return [{**asdict(r), "passes": round(r.passes, 4)} for r in self.report]


def build_mixture(
    sources: Sequence[DataSource],
    tokenizer,
    seq_len: int,
    *,
    total_rows: int | None = None,
    seed: int = 0,
) -> TrainingMix:
    """Read, tokenise, pack and mix ``sources``; ``total_rows`` defaults to the largest mix without repeats.

    Sources without weights (all of them ``None``) mix in their natural proportion: each row once.
    """
    if not sources:
        raise ValueError("no training source given")
    names = [s.path for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"a source is given twice: {names}")
    pad = pad_token_id(tokenizer)
    packed, documents, tokens = [], [], []
    for source in sources:
        docs = load_documents(source, tokenizer)
        ids = tokenize_documents(docs, tokenizer, desc=f"tokenising {source.path}")
        packed.append(pack_tokens(ids, seq_len, pad))
        documents.append(len(docs))
        tokens.append(int(ids.size))
    available = [rows.shape[0] for rows, _ in packed]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError(f"give a weight to every source or to none: {[(s.path, s.weight) for s in sources]}")
    weights = [s.weight for s in sources] if all(weighted) else available  # no weights: each source's rows once
    if total_rows is not None and total_rows < 1:
        raise ValueError(f"total_rows={total_rows} must be at least 1")
    total = default_total(weights, available) if total_rows is None else total_rows
    counts = mixture_counts(weights, total)
    rng = np.random.default_rng(seed)
    picked = [draw_rows(a, c, rng) for a, c in zip(available, counts, strict=True)]
    row_sources = np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts)])
    order = rng.permutation(total)
    row_sources = row_sources[order]
    order = torch.from_numpy(order)
    ids = torch.cat([rows[torch.from_numpy(p)] for (rows, _), p in zip(packed, picked, strict=True)])[order]
    mask = torch.cat([m[torch.from_numpy(p)] for (_, m), p in zip(packed, picked, strict=True)])[order]
    share = np.asarray(weights) / sum(weights)
    report = [SourceReport(s.path, float(w), float(sh), d, t, a, c)
              for s, w, sh, d, t, a, c in zip(sources, weights, share, documents, tokens, available, counts, strict=True)]
    return TrainingMix(TokenChunks(ids, mask), report, row_sources)
