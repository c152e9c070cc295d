"""Training objectives: token-mean SFT and the GDRT group-DRO objective (method.md §5).

Notation, for the target tokens i of a batch (labels != -100): ce_i the token cross-entropy, g(i) the
token's group, N_g the number of tokens of group g, S_g = sum_{i: g(i)=g} ce_i, L_g = S_g / N_g.

    L_GDRT = tau * log sum_{g present} pi_g exp(L_g / tau)            (pi renormalised over present g)
    w_g    = pi_g exp(L_g / tau) / sum_{h present} pi_h exp(L_h / tau)  (the maximiser of the KL-DRO)
    dL_GDRT/dtheta = sum_g w_g dL_g/dtheta = sum_i (w_g(i) / N_g(i)) dce_i/dtheta

The last line is what makes the objective exact under gradient accumulation and data parallelism: with
w and N computed once on the whole optimiser batch, `weighted_token_loss` is linear in the tokens, so its
gradients summed over micro-batches (and ranks) equal the gradient of `gdrt_loss` on the whole batch.
One optimiser step, as the trainer runs it (gdrt_core.train.step builds the step's plan; StepWeights
in gdrt_core.train.data holds the policy):

    N_g = sum over micro-batches of `group_token_counts` (data only, before any forward)
    batch policy:  S_g = sum over micro-batches of `group_sums` (no-grad look-ahead when the batch is split)
    (S_g, N_g) -> `all_reduce_group_totals` (one collective)
    batch policy:  w = `dro_weights(group_losses_from_sums(S, N), N, ...)`
    lagged policy: w = `dro_weights(GroupLossEMA.losses_for_weights(), N, ...)`; after the step
                   `GroupLossEMA.update(S/N, N)`
    then for each micro-batch: backward of world_size * `weighted_group_loss(group_sums(...), w, N)`
    (= `weighted_token_loss`; DDP averages gradients over ranks; no division by the accumulation steps).
    SFT is the same step with one group and w = (1,): the token mean over the whole optimiser batch.

Limits: tau = inf gives the pi-weighted mean of the L_g (the "group balanced" ablation with a uniform
pi), tau = 0 the worst-group loss; both are computed exactly rather than through an overflowing exp.

This module imports torch at import time: only training-side code imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdrt_core.errors import GdrtError

IGNORE_INDEX = -100
PRIORS = ("uniform", "size")

Prior = str | Sequence[float] | torch.Tensor


# --- token cross-entropy -----------------------------------------------------------------------------


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (in float32, or float64 for float64 logits) and the mask of scored tokens;
    no shifting.

    Returns (ce, mask), both [B, T]; ce is 0 where labels == -100.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    batch, seq, vocab = logits.shape
    flat_labels = labels.reshape(batch * seq)  # [B*T]
    mask = labels != IGNORE_INDEX  # [B, T]
    # Only the target rows are upcast and scored: targets are a few tokens of a long prompt, and a
    # float32 copy of all [B*T, V] logits is the largest tensor of the step.
    rows = mask.reshape(-1).nonzero(as_tuple=True)[0]  # [N]
    target_logits = logits.reshape(batch * seq, vocab).index_select(0, rows)  # [N, V]
    if target_logits.dtype != torch.float64:
        target_logits = target_logits.float()
    target_ce = F.cross_entropy(target_logits, flat_labels.index_select(0, rows), reduction="none")  # [N]
    ce = torch.zeros(batch * seq, dtype=target_ce.dtype, device=logits.device).index_add(0, rows, target_ce)
    return ce.view(batch, seq), mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the tokens with labels != -100 (the SFT baseline).

    A batch without any scored token gives 0 (still attached to the graph, so backward works).
    """
    ce, mask = token_cross_entropy(logits, labels)
    return ce.sum() / mask.sum().clamp(min=1)


# --- per-group sums (the exact-accumulation building block) ------------------------------------------


def _group_sums_from_ce(
    ce: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_g and N_g from per-token ce [B, T], mask [B, T] and group ids [B, T]."""
    if group_ids.shape != ce.shape:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must have the labels' shape {tuple(ce.shape)}")
    gid = group_ids.to(device=ce.device, dtype=torch.long)
    bad = mask & ((gid < 0) | (gid >= num_groups))  # [B, T]
    if bool(bad.any()):
        raise GdrtError(
            f"a target token has group id {int(gid[bad][0])}, outside 0..{num_groups - 1}",
            hint="the token groups must come from the grouping stage run with the same number of groups "
            "and cover every target token (labels != -100)",
        )
    flat_gid = torch.where(mask, gid, torch.zeros_like(gid)).reshape(-1)  # [B*T]
    maskf = mask.reshape(-1).to(ce.dtype)  # [B*T]
    sums = torch.zeros(num_groups, dtype=ce.dtype, device=ce.device).scatter_add(
        0, flat_gid, ce.reshape(-1) * maskf
    )  # [G]
    counts = torch.zeros(num_groups, dtype=torch.long, device=ce.device).scatter_add(
        0, flat_gid, mask.reshape(-1).long()
    )  # [G]
    return sums, counts


def group_sums(
    logits: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, *, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group cross-entropy sums S_g [G] (float32, differentiable) and token counts N_g [G] (long).

    Sums and counts add up over micro-batches and ranks (all-reduce SUM), which is how the trainer gets
    the whole optimiser batch's group losses L_g = S_g / N_g for the `batch` weights policy.
    Tokens with labels == -100 are ignored whatever their group id; every other token must have a group
    id in [0, num_groups).
    """
    ce, mask = token_cross_entropy(logits, labels)
    return _group_sums_from_ce(ce, mask, group_ids, num_groups)


def group_losses_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """L_g = S_g / N_g, and 0 for groups without tokens (they are masked out by `counts` downstream)."""
    return sums / counts.clamp(min=1).to(sums.dtype)


# --- prior and the closed-form weights ---------------------------------------------------------------


def _check_tau(tau: float) -> None:
    if not (tau >= 0.0) or math.isnan(tau):
        raise GdrtError(
            f"tau must be >= 0 (0 = worst group, inf = prior-weighted mean), got {tau}",
            hint="set the training setting tau to a positive number, e.g. 1.0",
        )


def prior_log_weights(counts: torch.Tensor, prior: Prior = "uniform") -> torch.Tensor:
    """log pi_g over the present groups (counts > 0), renormalised over them; -inf for absent groups.

    float64, because at large tau the objective multiplies rounding errors of log pi_g by tau.

    prior: "uniform" (pi_g = 1 / #present), "size" (pi_g = N_g / N, the groups' token frequency in the
    counts given, i.e. the whole optimiser batch when the counts are whole-batch counts), or explicit
    positive per-group masses (e.g. the training-set group sizes from groups.json), renormalised over
    the present groups.
    """
    present = counts > 0  # [G]
    if isinstance(prior, str):
        if prior == "uniform":
            mass = present.to(torch.float64)
        elif prior == "size":
            mass = counts.to(torch.float64)
        else:
            raise GdrtError(
                f"unknown group prior {prior!r}",
                hint=f"use one of {', '.join(PRIORS)} or a list of group masses",
            )
    else:
        mass = torch.as_tensor(prior, dtype=torch.float64, device=counts.device)
        if mass.shape != counts.shape:
            raise GdrtError(
                f"the group prior has {mass.numel()} values for {counts.numel()} groups",
                hint="give one mass per group",
            )
        if not bool((mass > 0).all()):
            raise GdrtError("every group prior mass must be > 0", hint=f"got {mass.tolist()}")
    mass = torch.where(present, mass.to(counts.device), torch.zeros_like(mass, device=counts.device))
    total = mass.sum().clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(present, torch.log(mass / total), torch.full_like(mass, -math.inf))  # [G]


def _dro_logits(
    group_losses: torch.Tensor, log_prior: torch.Tensor, present: torch.Tensor, tau: float
) -> torch.Tensor:
    """log pi_g + L_g / tau on present groups, -inf elsewhere (a finite 0 everywhere if none is present,
    so that logsumexp and its backward stay NaN-free on an empty batch)."""
    z = torch.where(present, log_prior + group_losses / tau, torch.full_like(log_prior, -math.inf))
    return torch.where(present.any(), z, torch.zeros_like(z))  # [G]


def dro_weights(
    group_losses: torch.Tensor, counts: torch.Tensor, prior: Prior = "uniform", tau: float = 1.0
) -> torch.Tensor:
    """The closed-form KL-DRO weights w_g = pi_g exp(L_g / tau) / sum_h pi_h exp(L_h / tau) (detached).

    Computed as a softmax over present groups (counts > 0); absent groups get w_g = 0; all zeros when no
    group is present. tau = inf gives w = pi; tau = 0 puts the mass on the worst group(s), split evenly
    on ties.
    """
    _check_tau(tau)
    out_dtype = torch.float64 if group_losses.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        losses = group_losses.detach().double()
        present = counts > 0  # [G]
        log_pi = prior_log_weights(counts, prior).double()  # [G]
        if math.isinf(tau):
            w = torch.exp(log_pi)
        elif tau == 0.0:
            masked = torch.where(present, losses, torch.full_like(losses, -math.inf))
            is_max = present & (masked == masked.max())
            w = is_max.float() / is_max.sum().clamp(min=1)
        else:
            w = torch.softmax(_dro_logits(losses, log_pi, present, tau), dim=0)
        return torch.where(present, w, torch.zeros_like(w)).to(out_dtype)  # [G]


def dro_objective(
    group_losses: torch.Tensor, counts: torch.Tensor, prior: Prior = "uniform", tau: float = 1.0
) -> torch.Tensor:
    """L_GDRT = tau * logsumexp_g (log pi_g + L_g / tau) over present groups (differentiable in L_g).

    tau = inf gives sum_g pi_g L_g, tau = 0 gives max_g L_g; no group present gives 0.
    """
    _check_tau(tau)
    present = counts > 0  # [G]
    out_dtype = group_losses.dtype if group_losses.is_floating_point() else torch.float32
    # float64 on the [G] group values: at large tau, log pi_g + L_g / tau loses L_g's digits in float32
    losses = group_losses.double()
    log_pi = prior_log_weights(counts, prior).double()  # [G]
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    if math.isinf(tau):
        pi = torch.exp(log_pi)
        return torch.where(present, pi * losses, torch.zeros_like(losses)).sum().to(out_dtype)
    if tau == 0.0:
        masked = torch.where(present, losses, torch.full_like(losses, -math.inf))
        masked = torch.where(present.any(), masked, torch.zeros_like(masked))
        return torch.where(present.any(), masked.amax(), zero).to(out_dtype)
    lse = torch.logsumexp(_dro_logits(losses, log_pi, present, tau), dim=0)
    return torch.where(present.any(), tau * lse, zero).to(out_dtype)


# --- the public objective ----------------------------------------------------------------------------


@dataclass
class GdrtStats:
    """What GDRT logs per step (all detached): L_g, w_g, N_g, the plain SFT loss of the same tokens."""

    group_losses: torch.Tensor  # [G], 0 for absent groups
    weights: torch.Tensor  # [G], 0 for absent groups
    group_counts: torch.Tensor  # [G] long
    sft_loss: torch.Tensor  # []
    loss: torch.Tensor  # [] the GDRT objective's value

    def as_log_dict(self) -> dict[str, float]:
        """Flat floats for a logger: gdrt_loss, sft_loss, and group_loss/g, group_weight/g, group_tokens/g
        for the groups present in the batch."""
        out = {"gdrt_loss": float(self.loss), "sft_loss": float(self.sft_loss)}
        counts = self.group_counts.tolist()
        losses = self.group_losses.tolist()
        weights = self.weights.tolist()
        for g, n in enumerate(counts):
            out[f"group_tokens/{g}"] = float(n)
            if n > 0:
                out[f"group_loss/{g}"] = losses[g]
                out[f"group_weight/{g}"] = weights[g]
        return out


def gdrt_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int,
    tau: float = 1.0,
    prior: Prior = "uniform",
) -> tuple[torch.Tensor, GdrtStats]:
    """The GDRT objective on one batch: tau * log sum_{g present} pi_g exp(L_g / tau).

    logits [B, T, V]; labels and group_ids [B, T], already aligned with the logits (no shift here);
    tokens with labels == -100 are ignored (their group id may be anything, e.g. -1). L_g is the mean
    cross-entropy of group g's tokens; groups without tokens drop out and pi renormalises over the rest.
    The gradient is sum_g w_g grad L_g with w the closed-form weights reported in the stats.
    """
    _check_tau(tau)
    ce, mask = token_cross_entropy(logits, labels)  # [B, T], [B, T]
    sums, counts = _group_sums_from_ce(ce, mask, group_ids, num_groups)  # [G], [G]
    losses = group_losses_from_sums(sums, counts)  # [G]
    loss = dro_objective(losses, counts, prior, tau)
    stats = GdrtStats(
        group_losses=losses.detach(),
        weights=dro_weights(losses, counts, prior, tau),
        group_counts=counts,
        sft_loss=(sums.detach().sum() / counts.sum().clamp(min=1)),
        loss=loss.detach(),
    )
    return loss, stats


def weighted_group_loss(
    sums: torch.Tensor, weights: torch.Tensor, group_counts_total: torch.Tensor
) -> torch.Tensor:
    """sum_g w_g S_g / N_g: the linearised GDRT surrogate from a micro-batch's per-group sums.

    sums [G] (differentiable, e.g. `group_sums` of one micro-batch); weights [G] and group_counts_total [G]
    fixed for the optimiser step. The coefficients c_g = w_g / N_g are formed in float64 and cast to the
    sums' dtype. With one group, w = (1,) and N the step's token count it is the token-mean SFT share.
    """
    coefficients = weights.detach().double() / group_counts_total.double().clamp(min=1)  # [G] c_g
    return (coefficients.to(sums) * sums).sum()


def weighted_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor,
    group_counts_total: torch.Tensor,
) -> torch.Tensor:
    """The linearised GDRT surrogate of one micro-batch: sum_i w_g(i) * ce_i / N_g(i).

    weights [G] and group_counts_total [G] are fixed for the optimiser step (whole-batch counts, summed
    over micro-batches and ranks). Summed over the micro-batches of the step, the value is
    sum_g w_g L_g and the gradient is sum_g w_g grad L_g, which equals grad L_GDRT when w is
    `dro_weights` of the whole batch. Do not divide by the number of accumulation steps; under data
    parallelism that averages gradients, multiply by the world size.
    """
    sums, _ = group_sums(logits, labels, group_ids, num_groups=weights.shape[0])  # [G]
    return weighted_group_loss(sums, weights, group_counts_total.to(sums.device))


def group_token_counts(labels: torch.Tensor, group_ids: torch.Tensor, *, num_groups: int) -> torch.Tensor:
    """N_g [G] (long) of a batch from the data alone (no forward): group ids are known before the step."""
    mask = labels != IGNORE_INDEX  # [B, T]
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    _, counts = _group_sums_from_ce(zeros, mask, group_ids.to(labels.device), num_groups)
    return counts


def all_reduce_group_totals(
    sums: torch.Tensor, counts: torch.Tensor, tokens: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """S_g, N_g and a token total summed over all ranks in one all-reduce; unchanged without
    torch.distributed.

    `tokens` is any per-rank count that should travel in the same collective (the trainer's input tokens,
    for tokens/s). Packed into one float64 vector on the sums' device, which holds integer counts exactly
    up to 2**53.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts, tokens
    num_groups = sums.shape[0]
    packed = torch.cat([
        sums.detach().double(), counts.to(sums.device).double(),
        torch.tensor([tokens], dtype=torch.float64, device=sums.device),
    ])  # [2G + 1]
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total_sums = packed[:num_groups].to(sums.dtype)
    total_counts = packed[num_groups: 2 * num_groups].round().to(device=counts.device, dtype=counts.dtype)
    return total_sums, total_counts, float(packed[-1])


# --- lagged weights: an exponential moving average of the group losses --------------------------------


def ema_update(
    previous: torch.Tensor, seen: torch.Tensor, current: torch.Tensor, counts: torch.Tensor, ema: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EMA step of the group losses: v_g <- ema * v_g + (1 - ema) * L_g for groups present now.

    A group seen for the first time starts at its current loss; absent groups keep their value.
    ema = 0 keeps only the latest loss (the plain `lagged` policy). Returns (values [G], seen [G] bool).
    """
    if not 0.0 <= ema < 1.0:
        raise GdrtError(f"ema must be in [0, 1), got {ema}", hint="0 turns the moving average off")
    with torch.no_grad():
        present = counts.to(previous.device) > 0
        current = current.detach().to(previous)
        blended = torch.where(seen, ema * previous + (1.0 - ema) * current, current)
        values = torch.where(present, blended, previous)
        return values, seen | present


class GroupLossEMA:
    """Group losses carried across optimiser steps for the `lagged` weights policy (and its `ema`).

    Step t uses `losses_for_weights()` (the losses up to step t-1) in `dro_weights`, then calls
    `update` with step t's whole-batch group losses. Groups not seen yet take the mean of the seen
    groups' values (all equal, so w = pi, before anything is seen). Save `state_dict()` with the
    checkpoint so that a resumed run uses the same weights.
    """

    def __init__(self, num_groups: int, ema: float = 0.0):
        if not 0.0 <= ema < 1.0:
            raise GdrtError(f"ema must be in [0, 1), got {ema}", hint="0 turns the moving average off")
        self.num_groups = num_groups
        self.ema = ema
        self.values = torch.zeros(num_groups, dtype=torch.float32)
        self.seen = torch.zeros(num_groups, dtype=torch.bool)

    def update(self, group_losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.values, self.seen = ema_update(
            self.values, self.seen, group_losses.cpu().float(), counts.cpu(), self.ema
        )
        return self.values.clone()

    def losses_for_weights(self) -> torch.Tensor:
        if not bool(self.seen.any()):
            return torch.zeros(self.num_groups)
        fill = self.values[self.seen].mean()
        return torch.where(self.seen, self.values, fill)

    def state_dict(self) -> dict:
        return {
            "num_groups": self.num_groups,
            "ema": self.ema,
            "values": self.values.tolist(),
            "seen": self.seen.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_groups"] != self.num_groups:
            raise GdrtError(
                f"checkpoint has {state['num_groups']} groups, the run has {self.num_groups}",
                hint="resume with the same groups artifact",
            )
        self.values = torch.tensor(state["values"], dtype=torch.float32)
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
