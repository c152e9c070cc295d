"""The Trainer subclass: routes group ids to the GDRT objective, exact under accumulation and data parallelism.

The Trainer already prefetches the micro-batches of each optimiser step (`get_batch_samples`, where it
counts `num_items_in_batch`); that is where the step's group counts are summed and, when the batch policy
needs them and the batch is split (accumulation > 1 or several processes), where the no-grad look-ahead
computes the group losses. One all-reduce of [counts | ce sums | tokens] makes them global. `compute_loss`
then returns the micro-batch's share sum_i (w_g(i) / N_g(i)) ce_i with the step's fixed weights, so the
micro-batch gradients add up to the full-batch GDRT gradient. `log` adds the step stats (L_g, w_g, counts,
the plain SFT loss, the GDRT objective value, tokens/s) averaged since the last log.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer

from gdrt_core.loss import group_losses_from_sums, group_sums
from gdrt_core.train.data import StepWeights, shifted

GROUP_KEY = "group_ids"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
        self._coef: torch.Tensor | None = None  # [groups] c_g = w_g / N_g of the current step
        self._weights: torch.Tensor | None = None  # [groups] w_g of the current step
        self._counts = torch.zeros(0)  # [groups] whole-batch N_g of the current step
        self._tokens = 0.0
        self._micro_left = 0
        self._weights_from_forward = False  # batch policy, one micro-batch on one process: w from its forward
        self._reduce_at_end = False  # the step's L_g are only known after its last micro-batch
        self._ce_sums = torch.zeros(0)  # [groups] this rank's detached ce sums of the step
        self._stat_buffer: list[dict[str, float]] = []
        # sums over this process's training steps of the all-reduced step losses (exact on every rank)
        # (saved in every checkpoint and restored on resume, so that the means cover the whole run)
        self.step_totals = {"steps": 0, "loss": 0.0, "loss_sft": 0.0, "loss_gdrt": 0.0}
        self._tokens_since_log = 0.0
        self._last_log_time = time.perf_counter()

    # ------------------------------------------------------------------------------ valid NDCG@10

    def valid_ndcg_value(self) -> float:
        """NDCG@10 of the current model on the valid sample: ranked on rank 0, the same number on every rank."""
        import torch.distributed as dist

        box = [None]
        if self.is_world_process_zero():
            with self.autocast_smart_context_manager():
                box[0] = float(self.valid_ndcg(self.accelerator.unwrap_model(self.model)))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.ndcg_in_evaluate:
            metrics["eval_ndcg@10"] = self.valid_ndcg_value()
            self.log({"eval_ndcg@10": metrics["eval_ndcg@10"]})
        return metrics

    # ------------------------------------------------------------ step preparation (the look-ahead)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's prefetch of one optimiser step's micro-batches, plus the step's N_g and w."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._prepare_step(batch_samples)
        return batch_samples, num_items_in_batch

    def _prepare_step(self, batch_samples: list[dict[str, Any]]) -> None:
        sw = self.step_weights
        num_groups = sw.num_groups
        split = len(batch_samples) > 1 or _world_size() > 1
        lookahead = sw.needs_lookahead and split
        counts = torch.zeros(num_groups, dtype=torch.float64)
        tokens = 0.0
        for mb in batch_samples:
            labels = mb["labels"][:, 1:]  # [batch, seq-1] the predicted tokens
            groups = self._group_ids(mb)[:, 1:][labels != -100]  # [n_targets]
            counts += torch.bincount(groups.cpu().clamp(min=0), minlength=num_groups)[:num_groups].double()
            tokens += float(mb["attention_mask"].sum())
        sums = self._lookahead_sums(batch_samples) if lookahead else torch.zeros(num_groups, dtype=torch.float64)
        packed = torch.cat([counts, sums.cpu(), torch.tensor([tokens], dtype=torch.float64)])
        packed = _all_reduce_sum(packed.to(self.args.device)).cpu()  # one collective per step
        counts, sums = packed[:num_groups], packed[num_groups: 2 * num_groups]
        self._counts, self._tokens = counts, float(packed[-1])
        self._tokens_since_log += self._tokens
        self._micro_left = len(batch_samples)
        self._ce_sums = torch.zeros(num_groups, dtype=torch.float64)
        self._weights_from_forward = sw.needs_lookahead and not split
        self._reduce_at_end = not lookahead
        if self._weights_from_forward:
            return  # compute_loss sets w from the forward itself (the whole batch is one micro-batch)
        losses = group_losses_from_sums(sums, counts) if lookahead else None
        self._set_weights(sw.weights(counts, losses))
        if lookahead:
            self._finish_step(sums)

    @torch.no_grad()
    def _lookahead_sums(self, batch_samples: list[dict[str, Any]]) -> torch.Tensor:
        """Per-group ce sums S_g [groups] of this rank's micro-batches under the current parameters."""
        model = self.model_wrapped
        sums = torch.zeros(self.step_weights.num_groups, dtype=torch.float64)
        for mb in batch_samples:
            inputs = self._prepare_inputs(mb)
            with self.compute_loss_context_manager():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits, labels, groups = shifted(outputs.logits, inputs["labels"], self._group_ids(inputs))
            s, _ = group_sums(logits, labels, groups, num_groups=self.step_weights.num_groups)
            sums += s.double().cpu()
        return sums

    def _group_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's group ids [batch, seq]; SFT puts every token in group 0 (the groups do not matter)."""
        if self.step_weights.objective == "sft" or GROUP_KEY not in batch:
            return torch.zeros_like(batch["labels"])
        return batch[GROUP_KEY]

    def _set_weights(self, weights: torch.Tensor) -> None:
        self._weights = weights
        coef = self.step_weights.token_coefficients(weights, self._counts)
        self._coef = coef.to(device=self.args.device, dtype=torch.float32)

    def _finish_step(self, sums: torch.Tensor) -> None:
        """Record the step's stats (L_g, w_g, N_g, SFT loss, GDRT value); hand its L_g to the policy."""
        sw = self.step_weights
        counts = self._counts
        losses = group_losses_from_sums(sums, counts)
        total = float(counts.sum())
        stats = {"loss_sft": float(sums.sum()) / total if total else 0.0}
        if sw.objective == "gdrt":
            stats["loss_gdrt"] = sw.objective_value(losses, counts)
            for g in range(sw.num_groups):
                stats[f"group_tokens/{g}"] = float(counts[g])
                if counts[g] > 0:
                    stats[f"group_loss/{g}"] = float(losses[g])
                    stats[f"group_weight/{g}"] = float(self._weights[g])
        sw.end_step(losses, counts)
        self._stat_buffer.append(stats)
        self.step_totals["steps"] += 1
        # the loss the Trainer optimises (= its `loss` log): sum_g c_g * ce-sum_g over the whole batch
        self.step_totals["loss"] += float((self._coef.detach().double().cpu() * sums.double()).sum())
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
        sw = self.step_weights
        if not model.training or self._micro_left <= 0:
            # evaluation: group ids are irrelevant (-1 outside the targets, any group in range)
            sums, counts = group_sums(logits, labels, torch.zeros_like(labels), num_groups=1)
            loss = sums.sum() / counts.sum().clamp(min=1)
            return (loss, outputs) if return_outputs else loss

        sums, _ = group_sums(logits, labels, group_ids, num_groups=sw.num_groups)  # [groups] differentiable
        if self._weights_from_forward:
            self._set_weights(sw.weights(self._counts, group_losses_from_sums(sums.detach().double().cpu(), self._counts)))
        # = loss.weighted_token_loss: sum_i w_g(i) ce_i / N_g(i), from the sums already computed
        loss = (self._coef * sums).sum()
        # DDP and DeepSpeed average the ranks' gradients; the step objective is their sum
        loss = loss * _world_size()
        self._ce_sums += sums.detach().double().cpu()
        self._micro_left -= 1
        if self._micro_left == 0 and self._reduce_at_end:
            self._finish_step(_all_reduce_sum(self._ce_sums.to(self.args.device)).cpu())
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
