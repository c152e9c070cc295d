"""The plan of one optimiser step: everything its micro-batches need, decided before the first one runs.

A step is fully described by the whole optimiser batch's group token counts N_g (data, known before any
forward), the weights w_g (method.md §5: from the policy, once per step) and where the step is in its
micro-batches. `plan_step` builds the plan once per optimiser step from the all-reduced totals; the trainer
replaces it with `after_micro_batch` as micro-batches run, and reads off `finished`. The three ways the
weights are known:

- `lagged` policy and SFT: from the policy before the step (no forward needed);
- `batch` policy, batch split over micro-batches or ranks: from the no-grad look-ahead's whole-batch S_g
  (`lookahead_sums`), before the step;
- `batch` policy, the whole batch in one forward on one process: from that forward itself (`weights` is
  None in the plan until then); no look-ahead is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gdrt_core.loss import group_losses_from_sums


@dataclass(frozen=True)
class StepPlan:
    """One optimiser step of the SFT / GDRT objective (immutable; progress makes a new plan)."""

    policy: str  # "sft" | "batch" | "lagged": where the weights come from
    counts: torch.Tensor  # [G] long, N_g of the whole optimiser batch (every micro-batch, every rank)
    tokens: float  # input tokens of the whole optimiser batch (attention mask sum; for tokens/s)
    micro_batches: int  # this rank's micro-batches in the step
    world_size: int  # processes sharing the step; DDP averages their gradients
    weights: torch.Tensor | None  # [G] w_g for the step; None until the forward sets it (batch, unsplit)
    lookahead_sums: torch.Tensor | None = None  # [G] whole-batch S_g from the look-ahead (batch policy, split)
    done: int = 0  # micro-batches of this rank run so far
    ce_sums: torch.Tensor | None = None  # [G] float64, this rank's detached S_g of the micro-batches run so far

    @property
    def weights_from_forward(self) -> bool:
        """The `batch` policy with the whole batch in one forward: w comes from that forward's losses."""
        return self.weights is None

    @property
    def stats_at_end(self) -> bool:
        """Whether the step's group losses are known only after its last micro-batch (no look-ahead)."""
        return self.lookahead_sums is None

    @property
    def finished(self) -> bool:
        return self.done >= self.micro_batches

    def after_micro_batch(self, sums: torch.Tensor, weights: torch.Tensor) -> StepPlan:
        """The plan once a micro-batch with detached per-group sums `sums` [G] has run under `weights`."""
        sums = sums.detach().double().cpu()
        total = sums if self.ce_sums is None else self.ce_sums + sums
        return replace(self, weights=weights, done=self.done + 1, ce_sums=total)


def plan_step(
    step_weights,
    *,
    counts: torch.Tensor,
    tokens: float,
    micro_batches: int,
    world_size: int,
    lookahead_sums: torch.Tensor | None = None,
) -> StepPlan:
    """The step's plan from its all-reduced totals (counts [G], and S_g [G] when a look-ahead ran).

    `step_weights` is the run's `StepWeights` (the policy and its history across steps); for the `batch`
    policy it is consulted here when the look-ahead gave the step's losses, else by the trainer after the
    forward of the single micro-batch.
    """
    split = micro_batches > 1 or world_size > 1
    if step_weights.objective == "sft":
        policy = "sft"
    else:
        policy = step_weights.policy
    if step_weights.needs_lookahead:
        if lookahead_sums is None:
            if split:
                raise ValueError("a split optimiser batch needs the look-ahead's group sums for the batch policy")
            weights = None  # set from the single forward
        else:
            weights = step_weights.weights(counts, group_losses_from_sums(lookahead_sums, counts))
    else:
        lookahead_sums = None
        weights = step_weights.weights(counts, None)
    return StepPlan(policy=policy, counts=counts, tokens=tokens, micro_batches=micro_batches,
                    world_size=world_size, weights=weights, lookahead_sums=lookahead_sums)
