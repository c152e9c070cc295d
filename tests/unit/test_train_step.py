"""The optimiser step's plan (gdrt_core.train.step) and the surrogate it feeds, against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from gdrt_core.loss import weighted_group_loss, weighted_token_loss
from gdrt_core.train.data import StepWeights
from gdrt_core.train.step import plan_step

LN2 = math.log(2.0)


def test_weighted_group_loss_is_the_linear_surrogate():
    """S = (3 ln 2, 2 ln 2), N = (3, 1), w = (1/4, 3/4):
    value = 1/4 * 3 ln 2 / 3 + 3/4 * 2 ln 2 / 1 = 1.75 ln 2; d value / d S_g = w_g / N_g = (1/12, 3/4)."""
    sums = torch.tensor([3 * LN2, 2 * LN2], requires_grad=True)
    value = weighted_group_loss(sums, torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([3, 1]))
    value.backward()
    assert value.item() == pytest.approx(1.75 * LN2, rel=1e-6)
    assert sums.grad.tolist() == pytest.approx([1 / 12, 0.75], rel=1e-6)


def test_sft_is_one_group_with_unit_weight():
    """SFT: one group, w = (1,), N = 4 tokens in the whole optimiser batch, S = 6 ln 2 -> 1.5 ln 2 (token mean)."""
    sums = torch.tensor([6 * LN2])
    assert weighted_group_loss(sums, torch.tensor([1.0]), torch.tensor([4])).item() == pytest.approx(1.5 * LN2)


def test_weighted_token_loss_is_group_sums_then_the_surrogate():
    """Labels 0, 1, 2 under probabilities (1/2, 1/4, 1/8, 1/8): ce = (1, 2, 3) ln 2, groups (0, 1, 1), N = (2, 2)
    over the whole batch (this micro-batch holds half of it), w = (1/2, 1/2):
    1/2 * ln 2 / 2 + 1/2 * 5 ln 2 / 2 = 1.5 ln 2."""
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(1, 3, 4)  # [B, T, V]
    labels = torch.tensor([[0, 1, 2]])
    groups = torch.tensor([[0, 1, 1]])
    value = weighted_token_loss(logits, labels, groups, torch.tensor([0.5, 0.5]), torch.tensor([2, 2]))
    assert value.item() == pytest.approx(1.5 * LN2, rel=1e-6)


def test_lagged_plan_has_its_weights_before_the_step():
    """lagged, nothing seen yet: w = pi = (1/2, 1/2) from the counts alone; the stats wait for the step's end."""
    plan = plan_step(StepWeights(2, policy="lagged"), counts=torch.tensor([3, 1]), tokens=10.0, micro_batches=4,
                     world_size=2)
    assert plan.policy == "lagged" and plan.weights.tolist() == pytest.approx([0.5, 0.5])
    assert plan.stats_at_end and not plan.weights_from_forward and not plan.finished


def test_batch_plan_with_lookahead_is_the_closed_form():
    """batch, split: look-ahead S = (3, 2), N = (3, 1) -> L = (1, 2), tau 1, uniform pi:
    w = (e, e^2) / (e + e^2) = (1, e) / (1 + e) = (0.26894, 0.73106); the stats are known before the step."""
    plan = plan_step(StepWeights(2), counts=torch.tensor([3, 1]), tokens=10.0, micro_batches=2, world_size=1,
                     lookahead_sums=torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert plan.policy == "batch" and not plan.stats_at_end
    assert plan.weights.tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], rel=1e-6)


def test_batch_plan_of_one_forward_waits_for_it():
    """batch, one micro-batch on one process: no look-ahead, w from the forward; split without sums is a bug."""
    sw = StepWeights(2)
    plan = plan_step(sw, counts=torch.tensor([3, 1]), tokens=10.0, micro_batches=1, world_size=1)
    assert plan.weights_from_forward and plan.stats_at_end
    with pytest.raises(ValueError, match="look-ahead"):
        plan_step(sw, counts=torch.tensor([3, 1]), tokens=10.0, micro_batches=2, world_size=1)


def test_sft_plan_and_progress():
    """sft: w = (1,); two micro-batches with S = 1.5 and 2.5 accumulate to 4.0 and finish the step."""
    plan = plan_step(StepWeights(1, objective="sft"), counts=torch.tensor([4]), tokens=8.0, micro_batches=2,
                     world_size=1)
    assert plan.policy == "sft" and plan.weights.tolist() == [1.0]
    plan = plan.after_micro_batch(torch.tensor([1.5]), plan.weights)
    assert plan.done == 1 and not plan.finished
    plan = plan.after_micro_batch(torch.tensor([2.5]), plan.weights)
    assert plan.finished and plan.ce_sums.tolist() == [4.0]
