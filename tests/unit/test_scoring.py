"""Teacher-forced target log-probs under attention removal and token replacement (gdrt_core.scoring)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gdrt_core.scoring import (
    ScoringRequest,
    build_batch,
    replace_tokens,
    score_batch,
    target_logprobs,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


class TableLM(torch.nn.Module):
    """A causal LM with a hand-set next-token table: logits(q) = sum of W[token k] over the keys k that
    query q attends, plus P[position q] when positional. No learned attention: exact, hand-computable."""

    def __init__(self, table: torch.Tensor, positional: torch.Tensor | None = None):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)  # [vocab, vocab]
        self.positional = positional  # [max_pos, vocab] or None

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, **_):
        attends = (attention_mask[:, 0] == 0).float()  # [batch, q, k]
        rows = self.table[input_ids]  # [batch, k, vocab]
        logits = attends @ rows  # [batch, q, vocab]
        if self.positional is not None:
            logits = logits + self.positional[position_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def hand_table() -> torch.Tensor:
    """Token 0 adds nothing, token 1 adds ln2 to token 0's logit, token 2 adds ln3 to token 1's logit."""
    return torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, LN3, 0.0]])


def test_full_context_logprobs_match_hand_values():
    """Sequence [1, 2, 0], the last two tokens scored.

    Query 0 sees {1}: logits [ln2, 0, 0] -> p = [2, 1, 1] / 4, p(next = 2) = 1/4.
    Query 1 sees {1, 2}: logits [ln2, ln3, 0] -> p = [2, 3, 1] / 6, p(next = 0) = 2/6 = 1/3.
    """
    (lp,) = score_batch(TableLM(hand_table()), [ScoringRequest([1, 2, 0], 2)], pad_token_id=0)
    np.testing.assert_allclose(lp, [math.log(1 / 4), math.log(1 / 3)], rtol=1e-6)


def test_hidden_keys_are_not_attended_and_positions_stay():
    """Hide token index 0 (the 1). Query 0 still sees itself: p(2) = 1/4 as before.
    Query 1 sees {2} only: logits [0, ln3, 0] -> p = [1, 3, 1] / 5, p(0) = 1/5.
    With a positional table P[1] = [0, 0, ln4] added at position 1 (unchanged by hiding):
    logits [0, ln3, ln4] -> p = [1, 3, 4] / 8, p(0) = 1/8.
    """
    model = TableLM(hand_table())
    (lp,) = score_batch(model, [ScoringRequest([1, 2, 0], 2, hidden=[0])], pad_token_id=0)
    np.testing.assert_allclose(lp, [math.log(1 / 4), math.log(1 / 5)], rtol=1e-6)
    positional = torch.zeros(8, 3)
    positional[1] = torch.tensor([0.0, 0.0, LN4])
    (lp,) = score_batch(TableLM(hand_table(), positional), [ScoringRequest([1, 2, 0], 2, hidden=[0])], 0)
    np.testing.assert_allclose(lp, [math.log(1 / 4), math.log(1 / 8)], rtol=1e-6)


def test_replaced_inputs_score_the_original_labels():
    """Inputs [1, 0, 0] (token 2 replaced by the neutral 0), labels [2, 0]:
    query 0 sees {1}: p(2) = 1/4; query 1 sees {1, 0}: logits [ln2, 0, 0], p(0) = 2/4 = 1/2."""
    ids = replace_tokens([1, 2, 0], [1], neutral_id=0)
    assert ids == [1, 0, 0]
    (lp,) = score_batch(TableLM(hand_table()), [ScoringRequest(ids, 2, labels=[2, 0])], pad_token_id=0)
    np.testing.assert_allclose(lp, [math.log(1 / 4), math.log(1 / 2)], rtol=1e-6)


def test_left_padding_does_not_change_scores():
    """A short request batched with a longer one (left-padded, pad keys blocked) scores as when alone."""
    positional = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    model = TableLM(hand_table() + torch.rand(3, 3, generator=torch.Generator().manual_seed(1)), positional)
    short = ScoringRequest([1, 2, 0], 2, hidden=[1])
    long = ScoringRequest([2, 2, 1, 0, 1, 2, 0, 1], 3, hidden=[2, 3])
    alone = [score_batch(model, [r], pad_token_id=1)[0] for r in (short, long)]
    together = target_logprobs(model, [short, long], pad_token_id=1, batch_size=2)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_build_batch_mask_layout():
    """Two rows, lengths 2 and 3; row 0 is left-padded by one, row 1 hides key 0.
    Blocked = -inf-like; every query sees itself."""
    ids, mask, pos = build_batch([ScoringRequest([5, 6], 1), ScoringRequest([7, 8, 9], 1, hidden=[0])], 0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert pos.tolist() == [[0, 0, 1], [0, 1, 2]]
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert allowed[1] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_request_validation():
    with pytest.raises(ValueError):
        ScoringRequest([1, 2], 2)
    with pytest.raises(ValueError):
        ScoringRequest([1, 2, 3], 2, labels=[1])


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_llama):
    return make_tiny_llama(50)


def test_llama_without_hidden_matches_plain_forward(tiny_llama):
    """No hidden tokens: the 4D mask path equals an ordinary causal forward pass."""
    ids = [3, 7, 11, 2, 9, 4, 8]
    requests = [ScoringRequest(ids, 3), ScoringRequest(ids[:4], 2)]
    lp = target_logprobs(tiny_llama, requests, pad_token_id=0)[0]
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([ids])).logits[0]  # [seq, vocab]
    ref = torch.log_softmax(logits, -1)[torch.arange(3, 6), torch.tensor(ids[4:])]
    np.testing.assert_allclose(lp, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_llama_hidden_equals_deleting_tokens_with_original_positions(tiny_llama):
    """Hiding keys = deleting those tokens while keeping every other token's position id."""
    ids = [3, 7, 11, 2, 9, 4, 8, 5]
    hidden = [2, 3]
    (lp,) = target_logprobs(tiny_llama, [ScoringRequest(ids, 3, hidden=hidden)], pad_token_id=0)
    kept = [i for i in range(len(ids)) if i not in hidden]
    with torch.no_grad():
        out = tiny_llama(torch.tensor([[ids[i] for i in kept]]), position_ids=torch.tensor([kept]))
        logits = out.logits[0]  # [kept, vocab]
    ref = torch.log_softmax(logits, -1)[torch.arange(len(kept) - 4, len(kept) - 1), torch.tensor(ids[-3:])]
    np.testing.assert_allclose(lp, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_shared_prompt_equals_scoring_each_sequence(tiny_llama):
    """Scoring continuations on a cached, left-padded prompt gives the log-probs of scoring
    prompt + continuation as one sequence (prompts of different lengths, 0-3 continuations each)."""
    from gdrt_core.scoring import shared_prompt_logprobs, supports_shared_prompt

    prompts = [[3, 7, 11, 2, 9], [5, 1], [8, 8, 4, 6, 2, 7, 3]]
    continuations = [[[4, 2, 1], [6]], [], [[9, 9], [1, 2, 3, 4], [5]]]
    assert supports_shared_prompt(tiny_llama) and not supports_shared_prompt(torch.nn.Linear(2, 2))
    shared = shared_prompt_logprobs(tiny_llama, prompts, continuations, pad_token_id=0, batch_size=2)
    assert [len(s) for s in shared] == [2, 0, 3]
    for prompt, conts, got in zip(prompts, continuations, shared, strict=True):
        for cont, lp in zip(conts, got, strict=True):
            (ref,) = target_logprobs(tiny_llama, [ScoringRequest(prompt + cont, len(cont))], pad_token_id=0)
            np.testing.assert_allclose(lp, ref, rtol=1e-4, atol=1e-5)
