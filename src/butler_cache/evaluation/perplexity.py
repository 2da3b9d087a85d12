"""Teacher-forced sparse perplexity (TokenButler's protocol).

In one forward pass per chunk, every query row of every sparse layer attends only to its own
selection of its causal past: ``ceil((1 - sparsity) * n)`` of its ``n`` past tokens, always including
the sinks and the token itself; layer 0 stays dense. This simulates decoding at every position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import ButlerCache
from ..compat import cache_argument
from ..predictor import ButlerPredictor
from ..training.data import TokenChunks


def sparse_perplexity(
    model: torch.nn.Module,
    chunks: TokenChunks,
    *,
    policy: str = "oracle",
    sparsity: float = 0.5,
    predictor: ButlerPredictor | None = None,
    sink_tokens: int = 4,
    local_window: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``chunks`` when each query row keeps ``1 - sparsity`` of its past.

    ``sparsity=0`` is dense attention (bit-identical to SDPA). ``local_window=1`` keeps only the token
    itself beyond the sinks, as in the paper's protocol.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1)")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(len(chunks)), desc=f"{policy} @ {sparsity:.0%}", disable=not progress, leave=False):
        ids = chunks[i]["input_ids"][None].to(device)
        cache = ButlerCache(model, predictor if policy == "butler" else None, policy=policy,
                            budget_ratio=1.0 - sparsity, sink_tokens=sink_tokens, local_window=local_window,
                            sparse_prefill=True)
        with torch.no_grad():
            logits = model(input_ids=ids, **cache_argument(cache)).logits  # [1, T, V]
        nll += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def decode_perplexity(
    model: torch.nn.Module,
    chunks: TokenChunks,
    make_cache,
    *,
    prefix: int = 256,
    progress: bool = True,
    desc: str = "decode perplexity",
) -> float:
    """Perplexity of each chunk's tokens after the first ``prefix``, fed one decode step at a time.

    The prefix is prefilled into ``make_cache()`` (dense unless the cache says otherwise); every later
    token is one decode step through the cache, so what decoding-only options change (prediction
    interval, neighbour fetching, eviction) shows up here, which teacher-forced perplexity cannot show.
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(len(chunks)), desc=desc, disable=not progress, leave=False):
        ids = chunks[i]["input_ids"][None].to(device)  # [1, T]
        if not 0 < prefix < ids.shape[1] - 1:
            raise ValueError(f"prefix={prefix} must leave tokens to decode in chunks of {ids.shape[1]}")
        cache = make_cache()
        with torch.no_grad():
            logits = model(input_ids=ids[:, :prefix], **cache_argument(cache)).logits[:, -1]  # [1, V]
            for t in range(prefix, ids.shape[1]):
                nll += F.cross_entropy(logits.float(), ids[:, t], reduction="sum").item()
                count += 1
                if t + 1 < ids.shape[1]:
                    logits = model(input_ids=ids[:, t : t + 1], **cache_argument(cache)).logits[:, -1]
    return math.exp(nll / count)
