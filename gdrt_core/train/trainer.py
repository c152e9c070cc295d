"""The Trainer subclass: routes group ids to the GDRT objective, exact under accumulation and data parallelism.

The Trainer already prefetches the micro-batches of each optimiser step (`get_batch_samples`, where it
counts `num_items_in_batch`); that is where the step is planned (gdrt_core.train.step): the whole batch's
group token counts (`loss.group_token_counts`), when the batch policy needs them and the batch is split
(accumulation > 1 or several processes) the no-grad look-ahead's group sums (`loss.group_sums`), one
all-reduce of both (`loss.all_reduce_group_totals`), then the step's weights. `compute_loss` returns the
micro-batch's share `loss.weighted_group_loss` = sum_i (w_g(i) / N_g(i)) ce_i with the step's fixed
weights, so the micro-batch gradients add up to the full-batch GDRT gradient. `log` adds the step stats
(L_g, w_g, counts, the plain SFT loss, the GDRT objective value, tokens/s) averaged since the last log.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer

from gdrt_core.loss import (
    all_reduce_group_totals,
    group_losses_from_sums,
    group_sums,
    group_token_counts,
    sft_loss,
    weighted_group_loss,
)
from gdrt_core.train.data import StepWeights, shifted
from gdrt_core.train.step import StepPlan, plan_step

GROUP_KEY = "group_ids"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """transformers' length grouping (`trainer_pt_utils.get_length_grouped_indices`: a random permutation cut
    into mega-batches of 50 optimiser batches, each sorted by length, the longest batch first) with the
    permutation seeded by (seed, epoch), so every process draws the same order and a resumed run the same
    epoch it was stopped in. The Trainer's own `LengthGroupedSampler` draws from the global random state,
    which a resume restores as it was at the checkpoint, not at the epoch's start.

    lengths: [windows] token counts; batch_size: windows per optimiser batch of one process.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import numpy as np
        from transformers.trainer_pt_utils import get_length_grouped_indices

        if not self.lengths:  # transformers' grouping indexes the first mega-batch
            return iter([])
        # (seed, epoch) mixed, so that seed s in epoch 1 does not draw seed s + 1's epoch 0 (as seed + epoch would)
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class GdrtTrainer(Trainer):
    """transformers.Trainer with the SFT / GDRT objective over token groups (see the module docstring)."""

    # compute_loss returns the micro-batch's share of the whole step's loss: never divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, step_weights: StepWeights, valid_ndcg=None, ndcg_in_evaluate: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_weights = step_weights
        # valid NDCG@10 scorer (evaluate.SampleNdcg) or None; with ndcg_in_evaluate every evaluate() reports
        # eval_ndcg@10 next to eval_loss, which is what selection by valid_ndcg@10 reads
        self.valid_ndcg = valid_ndcg
        self.ndcg_in_evaluate = ndcg_in_evaluate and valid_ndcg is not None
        self.plan: StepPlan | None = None  # the current optimiser step; None between steps
        self._stat_buffer: list[dict[str, float]] = []
        # sums over this process's training steps of the all-reduced step losses (exact on every rank)
        # (saved in every checkpoint and restored on resume, so that the means cover the whole run)
        self.step_totals = {"steps": 0, "loss": 0.0, "loss_sft": 0.0, "loss_gdrt": 0.0}
        self._tokens_since_log = 0.0
        self._last_log_time = time.perf_counter()

    def _get_train_sampler(self, train_dataset=None):
        """`train_sampling_strategy="group_by_length"`: `SeededLengthGroupedSampler` seeded by data_seed (the
        Trainer's own sampler for every other strategy)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler([len(f["input_ids"]) for f in dataset],
                                          self.args.train_batch_size * self.args.gradient_accumulation_steps, seed)

    def _get_eval_sampler(self, eval_dataset):
        """The valid windows in their order whatever the training order: transformers also groups the evaluation by
        length under group_by_length, which changes the valid loss (a mean of batch means) with `sampling`."""
        from torch.utils.data import SequentialSampler

        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        if eval_dataset is None or self.args.world_size > 1:
            return None  # several processes: accelerate shards the dataset in order, as for random
        return SequentialSampler(eval_dataset)

    # ------------------------------------------------------------------------------ valid NDCG@10

    def valid_ndcg_value(self) -> float:
        """NDCG@10 of the current model on the valid sample: ranked on rank 0, the same number on every rank.

        A failure of the ranking fails training on every rank (rank 0 re-raises it, the others raise an error
        naming it), so no rank waits for a number that will not come and no failure passes for a value.
        """
        import torch.distributed as dist

        from gdrt_core.errors import GdrtError

        box: list[tuple[str, Any]] = [("ok", None)]
        error: Exception | None = None
        if self.is_world_process_zero():
            try:
                with self.autocast_smart_context_manager():
                    box[0] = ("ok", float(self.valid_ndcg(self.accelerator.unwrap_model(self.model))))
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
                error, box[0] = e, ("failed", f"{type(e).__name__}: {e}")
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "failed":
            raise GdrtError(f"valid NDCG@10 failed on rank 0: {value}",
                            hint="see rank 0's traceback; set ndcg_every_epoch false to train without it")
        return value

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.ndcg_in_evaluate:
            metrics["eval_ndcg@10"] = self.valid_ndcg_value()
            self.log({"eval_ndcg@10": metrics["eval_ndcg@10"]})
        return metrics

    # ------------------------------------------------------------ step planning (the look-ahead)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's prefetch of one optimiser step's micro-batches, plus the step's plan."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self.plan = self._plan_step(batch_samples)
            if not self.plan.stats_at_end:
                self._finish_step(self.plan, self.plan.lookahead_sums)
        return batch_samples, num_items_in_batch

    def _plan_step(self, batch_samples: list[dict[str, Any]]) -> StepPlan:
        """Whole-batch N_g (and S_g from the look-ahead when the batch policy needs it), one all-reduce."""
        sw = self.step_weights
        device = self.args.device
        counts = torch.zeros(sw.num_groups, dtype=torch.long, device=device)  # [groups]
        tokens = 0.0
        for mb in batch_samples:
            labels, groups = mb["labels"][:, 1:], self._group_ids(mb)[:, 1:]  # [batch, seq-1] predicted tokens
            counts += group_token_counts(labels, groups, num_groups=sw.num_groups).to(device)
            tokens += float(mb["attention_mask"].sum())
        world_size = _world_size()
        lookahead = sw.needs_lookahead and (len(batch_samples) > 1 or world_size > 1)
        sums = self._lookahead_sums(batch_samples) if lookahead else torch.zeros(
            sw.num_groups, dtype=torch.float64, device=device)
        sums, counts, tokens = all_reduce_group_totals(sums, counts, tokens)  # one collective per step
        self._tokens_since_log += tokens
        return plan_step(sw, counts=counts.cpu(), tokens=tokens, micro_batches=len(batch_samples),
                         world_size=world_size, lookahead_sums=sums.cpu() if lookahead else None)

    @torch.no_grad()
    def _lookahead_sums(self, batch_samples: list[dict[str, Any]]) -> torch.Tensor:
        """Per-group ce sums S_g [groups] (float64) of this rank's micro-batches under the current parameters."""
        model = self.model_wrapped
        sums = torch.zeros(self.step_weights.num_groups, dtype=torch.float64, device=self.args.device)
        for mb in batch_samples:
            inputs = self._prepare_inputs(mb)
            with self.compute_loss_context_manager():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits, labels, groups = shifted(outputs.logits, inputs["labels"], self._group_ids(inputs))
            s, _ = group_sums(logits, labels, groups, num_groups=self.step_weights.num_groups)
            sums += s.double()
        return sums

    def _group_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's group ids [batch, seq]; SFT puts every token in group 0 (the groups do not matter)."""
        if self.step_weights.objective == "sft" or GROUP_KEY not in batch:
            return torch.zeros_like(batch["labels"])
        return batch[GROUP_KEY]

    def _finish_step(self, plan: StepPlan, sums: torch.Tensor) -> None:
        """Record the step's stats from its whole-batch S_g (L_g, w_g, N_g, SFT loss, GDRT value); hand its
        L_g to the policy."""
        sw = self.step_weights
        counts = plan.counts
        losses = group_losses_from_sums(sums, counts)
        total = float(counts.sum())
        stats = {"loss_sft": float(sums.sum()) / total if total else 0.0}
        if sw.objective == "gdrt":
            stats["loss_gdrt"] = sw.objective_value(losses, counts)
            for g in range(sw.num_groups):
                stats[f"group_tokens/{g}"] = float(counts[g])
                if counts[g] > 0:
                    stats[f"group_loss/{g}"] = float(losses[g])
                    stats[f"group_weight/{g}"] = float(plan.weights[g])
        sw.end_step(losses, counts)
        self._stat_buffer.append(stats)
        self.step_totals["steps"] += 1
        # the loss the Trainer optimises (= its `loss` log): the surrogate over the whole batch
        self.step_totals["loss"] += float(weighted_group_loss(sums.double(), plan.weights, counts))
        for key in ("loss_sft", "loss_gdrt"):
            if key in stats:
                self.step_totals[key] += stats[key]

    # ------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the micro-batch's share of the step objective; evaluation: token-mean cross-entropy."""
        group_ids = self._group_ids(inputs)
        inputs.pop(GROUP_KEY, None)
        labels = inputs.pop("labels")
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits, labels, group_ids = shifted(outputs.logits, labels, group_ids)  # [batch, seq-1, ...]
        plan = self.plan
        if not model.training or plan is None:
            loss = sft_loss(logits, labels)  # evaluation: the group ids do not matter
            return (loss, outputs) if return_outputs else loss

        sw = self.step_weights
        sums, _ = group_sums(logits, labels, group_ids, num_groups=sw.num_groups)  # [groups] differentiable
        weights = plan.weights
        if plan.weights_from_forward:  # batch policy, the whole batch is this micro-batch
            weights = sw.weights(plan.counts, group_losses_from_sums(sums.detach().double().cpu(), plan.counts))
        # sum_i w_g(i) ce_i / N_g(i); DDP and DeepSpeed average the ranks' gradients, the step objective is their sum
        loss = weighted_group_loss(sums, weights.to(sums.device), plan.counts.to(sums.device)) * plan.world_size
        plan = plan.after_micro_batch(sums, weights)
        self.plan = None if plan.finished else plan
        if plan.finished and plan.stats_at_end:
            # the counts are global already: only this rank's S_g travel
            ce_sums, _, _ = all_reduce_group_totals(plan.ce_sums.to(self.args.device), torch.zeros_like(plan.counts))
            self._finish_step(plan, ce_sums.cpu())
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step stats averaged since the last log (training logs only) and tokens/s."""
        if "loss" in logs and self._stat_buffer:
            for key in sorted({k for s in self._stat_buffer for k in s}):
                values = [s[key] for s in self._stat_buffer if key in s]
                logs[key] = sum(values) / len(values)
            now = time.perf_counter()
            logs["tokens_per_s"] = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
            self._tokens_since_log = 0.0
            self._stat_buffer.clear()
        super().log(logs, start_time)
