"""A left-padded batch through a sparse ButlerCache equals its rows run one by one."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from butler_cache import ButlerCache, ButlerConfig, ButlerPredictor
from butler_cache.compat import cache_argument

from .conftest import FAMILIES, random_batch, tiny_model


def _cache(model, policy, budget):
    if policy in ("butler", "attentive"):
        torch.manual_seed(1)
        predictor_type = "strided" if policy == "butler" else "attentive"
        config = ButlerConfig.for_model(model, predictor_type=predictor_type, attentive_hidden_size=16)
        return ButlerCache(model, ButlerPredictor(config).double(), **budget)
    return ButlerCache(model, policy=policy, **budget)


@given(
    family=st.sampled_from(FAMILIES),
    policy=st.sampled_from(["butler", "attentive", "oracle"]),
    pads=st.lists(st.integers(0, 8), min_size=2, max_size=3),
    length=st.integers(14, 26),
    budget=st.sampled_from([{"token_budget": 10, "local_window": 4}, {"budget_ratio": 0.5, "local_window": 2}]),
    sparse_prefill=st.booleans(),
    seed=st.integers(0, 99),
)
def test_padded_batch_equals_rows_alone(family, policy, pads, length, budget, sparse_prefill, seed):
    model = tiny_model(family, seed=seed % 3, dtype=torch.float64)
    pads[0] = 0
    ids, mask = random_batch(len(pads), length, pads, seed=seed)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(input_ids=ids, attention_mask=mask,
                           **cache_argument(_cache(model, policy, dict(budget, sparse_prefill=sparse_prefill))), **kwargs)
    for row, pad in enumerate(pads):
        alone = model.generate(input_ids=ids[row : row + 1, pad:], attention_mask=mask[row : row + 1, pad:],
                               **cache_argument(_cache(model, policy, dict(budget, sparse_prefill=sparse_prefill))),
                               **kwargs)
        assert torch.equal(batch.sequences[row, length:], alone.sequences[0, length - pad :])
        for step_batch, step_alone in zip(batch.logits, alone.logits, strict=True):
            torch.testing.assert_close(step_batch[row], step_alone[0], rtol=1e-9, atol=1e-9)
