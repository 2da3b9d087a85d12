"""Selection (sinks + window + top-k within the budget) against a plain-Python reference."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from butler_cache import TokenBudget
from butler_cache.selection import key_validity, select_decode_tokens, select_tokens

from .reference import reference_selection


@st.composite
def selection_problems(draw):
    B, H, T, L = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 50))
    sinks, window = draw(st.integers(0, 5)), draw(st.integers(1, 8))
    if draw(st.booleans()):
        budget = TokenBudget(token_budget=draw(st.integers(sinks + window, sinks + window + 30)),
                             sink_tokens=sinks, local_window=window)
    else:
        budget = TokenBudget(budget_ratio=draw(st.floats(0.05, 1.0)), sink_tokens=sinks, local_window=window)
    pads = [draw(st.integers(0, L - 1)) for _ in range(B)]
    return B, H, T, L, budget, pads, draw(st.integers(0, 2**31 - 1))


@given(selection_problems())
def test_select_tokens_matches_python_reference(problem):
    B, H, T, L, budget, pads, seed = problem
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, H, T, L, generator=gen, dtype=torch.float64)
    causal = key_validity(None, T, L, torch.device("cpu"))  # [1, 1, T, L]
    padding = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]  # [B, L]
    valid = causal & padding[:, None, None, :]
    selection = select_tokens(scores, valid, budget)
    mask = selection.as_mask(L)
    as_dict = {"token_budget": budget.token_budget, "budget_ratio": budget.budget_ratio,
               "sink_tokens": budget.sink_tokens, "local_window": budget.local_window}
    for b in range(B):
        for h in range(H):
            for t in range(T):
                positions = [j for j in range(L) if valid[b, 0, t, j]]
                expected = reference_selection(dict(enumerate(scores[b, h, t].tolist())), positions, as_dict)
                got = set(torch.nonzero(mask[b, h, t]).flatten().tolist())
                assert got == expected, (b, h, t)
                assert selection.attended()[b, h, t] == len(expected)


def test_hand_computed_case():
    # 10 keys, 2 sinks, window 2, budget 6: keys 0, 1 (sinks), 8, 9 (window) + the two best of 2..7
    scores = torch.tensor([0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.0, 0.0]).view(1, 1, 1, 10)
    valid = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    sel = select_tokens(scores, valid, TokenBudget(token_budget=6, sink_tokens=2, local_window=2))
    assert sorted(sel.indices[sel.keep].tolist()) == [0, 1, 2, 4, 8, 9]
    # left padding of 3: the sinks are the first two *valid* keys, 3 and 4
    valid[..., :3] = False
    sel = select_tokens(scores, valid, TokenBudget(token_budget=6, sink_tokens=2, local_window=2))
    assert sorted(sel.indices[sel.keep].tolist()) == [3, 4, 5, 6, 8, 9]


def test_ratio_budget_rounds_up_exactly():
    budget = TokenBudget(budget_ratio=0.1, sink_tokens=0, local_window=1)
    assert budget.per_row(torch.tensor([30, 31, 1])).tolist() == [3, 4, 1]
    assert budget.for_length(30) == 3


def test_key_validity_of_float_mask():
    mask = torch.zeros(1, 1, 2, 4)
    mask[..., 0] = torch.finfo(torch.float32).min
    assert key_validity(mask, 2, 4, torch.device("cpu")).tolist() == [[[[False, True, True, True]] * 2]]


@given(selection_problems())
def test_select_decode_tokens_matches_select_tokens(problem):
    """The mask-free decode path selects the same keys as the general one (one row, no padding)."""
    B, H, _, L, budget, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, H, 1, L, generator=gen, dtype=torch.float64)
    valid = key_validity(None, 1, L, torch.device("cpu"))
    expected = select_tokens(scores, valid, budget)
    got = select_decode_tokens(scores, budget)
    assert torch.equal(got.as_mask(L), expected.as_mask(L))
    assert torch.equal(got.attended(), expected.attended())
    assert got.all_kept and bool(got.keep.all())
