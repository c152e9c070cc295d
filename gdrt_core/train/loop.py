"""One training process: setup -> train (resuming from the newest intact checkpoint) -> Model artifact.

Reads top to bottom: load data and model, build the Trainer, find a checkpoint, train, evaluate, save.
Every rank runs this; only rank 0 writes the artifact and talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gdrt_core.config import to_dict
from gdrt_core.errors import GdrtError, filesystem_error
from gdrt_core.train import CHECKPOINTS, TrainConfig

log = logging.getLogger(__name__)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish_distributed(*, wait: bool) -> None:
    """Leave the process group cleanly: every rank waits for rank 0 to finish writing the artifact, then
    the group is torn down (a worker exiting with the group still alive can abort at interpreter shutdown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _use_bf16(setting: str) -> bool:
    import torch

    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return setting == "true"


def weights_dtype(config: TrainConfig) -> str:
    """The dtype the model's weights are loaded (and kept) in.

    bf16 full fine-tuning keeps float32 weights: the Trainer's autocast computes in bfloat16, and the
    optimiser updates float32 master weights. In bfloat16 weights (8 bits of precision) an update smaller than
    about 1/256 of the weight rounds away, and training stalls (docs/benchmarks.md, "bf16 master weights").
    The weights are bfloat16 only where something else keeps the float32 copy or nothing updates them:
    DeepSpeed (its bf16 optimiser holds float32 master partitions) and LoRA (the base is frozen; PEFT keeps
    the adapters in float32).
    """
    if not _use_bf16(config.bf16):
        return "float32"
    return "bfloat16" if config.lora or config.deepspeed else "float32"


def training_arguments(config: TrainConfig, work_dir: Path, *, has_valid: bool):
    """TrainingArguments from the TrainConfig (the one place where the Trainer's knobs are set)."""
    import torch
    from transformers import TrainingArguments

    from gdrt_core.train import SELECTION_METRICS, selection_metric
    from gdrt_core.train.deepspeed import zero_config

    metric, greater_is_better = SELECTION_METRICS.get(selection_metric(config.select_best), ("loss", False))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    eval_strategy = ("steps" if config.eval_every else "epoch") if has_valid else "no"
    kwargs: dict[str, Any] = {}
    if config.eval_every:
        kwargs["eval_steps"] = config.eval_every
    if config.save_every:
        kwargs["save_steps"] = config.save_every
    return TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps else -1,
        optim=config.optim,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a share of the steps
        lr_scheduler_type=config.scheduler,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.data_seed if config.data_seed is not None else config.seed,
        train_sampling_strategy=config.sampling,
        bf16=_use_bf16(config.bf16),
        logging_strategy="steps",
        logging_steps=config.log_every,
        eval_strategy=eval_strategy,
        save_strategy="steps" if config.save_every else "epoch",
        save_total_limit=config.keep_checkpoints,
        load_best_model_at_end=config.select_best != "none" and has_valid,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        remove_unused_columns=False,  # the group ids must reach compute_loss
        prediction_loss_only=True,
        report_to="none",  # MLflow goes through gdrt_core.tracking (rank 0, retried, never fatal)
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        deepspeed=zero_config(config.deepspeed) if config.deepspeed else None,
        disable_tqdm=True,
        **kwargs,
    )


def _callbacks(trainer_ref: list, tracker, config: TrainConfig, run: dict) -> list:
    """Seal checkpoints (marker + hashes), forward logs to MLflow, valid NDCG@10 at epoch ends."""
    from transformers import TrainerCallback

    from gdrt_core.train.resume import seal_checkpoint

    class SealCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank has written its shard
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    trainer = trainer_ref[0]
                    seal_checkpoint(ckpt, step=state.global_step, run=run,
                                    extra_state={**trainer.step_weights.state_dict(), "step_totals": trainer.step_totals})
            _barrier()

    class ToMlflow(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                tracker.log_metrics({k: v for k, v in logs.items() if isinstance(v, (int, float))},
                                    step=state.global_step)

    class ValidNdcg(TrainerCallback):
        """The side metric at epoch ends (selection by valid_ndcg@10 computes it inside evaluate instead)."""

        def on_epoch_end(self, args, state, control, **kwargs):
            trainer = trainer_ref[0]
            if trainer.valid_ndcg is None or trainer.ndcg_in_evaluate:
                return
            trainer.log({"eval_ndcg@10": trainer.valid_ndcg_value()})  # -> log_history and ToMlflow

    class InitialValidLoss(TrainerCallback):
        """The valid loss before the first step, taken once the model is wrapped (DeepSpeed needs its
        training engine for this: an inference engine is ZeRO-3 only)."""

        def __init__(self):
            self.value: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            trainer = trainer_ref[0]
            if config.eval_at_start and state.global_step == 0 and trainer.eval_dataset is not None:
                self.value = trainer.evaluate()["eval_loss"]

    return [SealCheckpoint(), ToMlflow(), ValidNdcg(), InitialValidLoss()]


def _valid_ndcg(config: TrainConfig, dataset, tokenizer):
    """The valid NDCG@10 scorer (evaluate.SampleNdcg on the first valid_size windows), or None when off.

    Ranking runs on rank 0 only, so not under ZeRO-3 (its parameters are sharded: every rank would have to
    take part); the config check refuses select_best valid_ndcg@10 there.
    """
    from gdrt_core.evaluate import SampleNdcg

    wanted = config.ndcg_every_epoch or config.select_best == "valid_ndcg@10"
    if not wanted or config.valid_size <= 0:
        return None
    if config.deepspeed in ("zero3", "zero3-offload"):
        log.warning("valid NDCG@10 during training is off under ZeRO-3; run gdrt evaluate --split valid")
        return None
    return SampleNdcg(dataset, tokenizer, split="valid", limit=config.valid_size, batch_size=config.batch_size)


def _prepare_model(config: TrainConfig):
    from gdrt_core.models import ModelConfig, load_model, load_tokenizer, prepare_for_training

    model_cfg = ModelConfig(
        dtype=weights_dtype(config), device="none",
        trust_remote_code=config.trust_remote_code, lora=config.lora, lora_r=config.lora_r,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        lora_target_modules=list(config.lora_target_modules),
    )
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = load_model(config.model, dtype=model_cfg.dtype, device="none",
                       trust_remote_code=config.trust_remote_code, trainable_adapter=config.lora)
    model = prepare_for_training(model, model_cfg)
    return model, tokenizer


def check_adapter_not_empty(model_dir: Path) -> None:
    """A LoRA save (ZeRO-3 above all) must hold every adapter tensor with its full size."""
    from safetensors import safe_open

    path = model_dir / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()]
    if not keys or empty:
        raise GdrtError(
            f"the saved LoRA adapter is empty ({len(keys)} tensors, empty: {empty[:3]})", path=str(path),
            hint="under ZeRO-3 the weights must be gathered on save (stage3_gather_16bit_weights_on_model_save)",
        )


def train(config: TrainConfig) -> dict[str, Any] | None:
    """Train in this process (one rank of possibly several); rank 0 returns the Model manifest."""
    import torch
    import yaml
    from transformers import set_seed

    from gdrt_core.artifacts import atomic_output_dir, write_json_atomic, write_manifest
    from gdrt_core.dataset import Dataset
    from gdrt_core.tokenization import context_limit
    from gdrt_core.tracking import stage_run
    from gdrt_core.train import train_inputs
    from gdrt_core.train.data import (
        StepWeights,
        TrainCollator,
        build_features,
        groups_dataset_sha256,
        load_token_groups,
    )
    from gdrt_core.train.resume import (
        latest_valid_checkpoint,
        read_policy_state,
        remove_unsealed,
        run_fingerprint,
    )
    from gdrt_core.train.trainer import GdrtTrainer

    if config.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(config.cpu_threads)
    dataset = Dataset(config.dataset)
    token_groups, num_groups = None, 1
    if config.objective == "gdrt":
        token_groups, found_groups = load_token_groups(config.groups)
        num_groups = config.num_groups or found_groups
        if config.num_groups and config.num_groups < found_groups:
            raise GdrtError(f"num_groups={config.num_groups} but the Groups artifact has {found_groups} groups",
                            path=str(config.groups), hint="leave num_groups unset to use the artifact's")

    set_seed(config.seed)
    model, tokenizer = _prepare_model(config)
    max_length = context_limit(model, tokenizer)
    train_features = build_features(
        dataset, "train", tokenizer, token_groups=token_groups, limit=config.max_train, groups_path=str(config.groups),
        groups_dataset=groups_dataset_sha256(config.groups) if token_groups is not None else None,
        max_length=max_length,
    )
    valid_features = build_features(dataset, "valid", tokenizer, limit=config.valid_size, max_length=max_length)
    if not train_features:
        raise GdrtError("the train split is empty", path=str(config.dataset))

    out = Path(config.out).absolute()
    work_dir = out / CHECKPOINTS
    args = training_arguments(config, work_dir, has_valid=bool(valid_features))  # also starts the process group
    step_weights = StepWeights(num_groups, objective=config.objective, tau=config.tau, prior=config.prior,
                               policy=config.weights, ema=config.ema)

    resume = None
    if _is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
        resume = latest_valid_checkpoint(work_dir)
    resume = _broadcast(str(resume) if resume else None)
    state = read_policy_state(resume) if resume else None
    if resume:
        if state is not None:
            step_weights.load_state_dict(state)
        if _is_main():
            print(f"gdrt train: resuming from {resume}", flush=True)

    trainer_ref: list = []
    with stage_run("train", to_dict(config)) as tracker:
        trainer = GdrtTrainer(
            model=model, args=args, train_dataset=train_features,
            eval_dataset=valid_features or None, data_collator=TrainCollator(tokenizer.pad_token_id),
            processing_class=tokenizer, step_weights=step_weights,
            valid_ndcg=_valid_ndcg(config, dataset, tokenizer) if valid_features else None,
            ndcg_in_evaluate=config.select_best == "valid_ndcg@10",
            callbacks=_callbacks(trainer_ref, tracker, config, run_fingerprint(to_dict(config), train_inputs(config))),
        )
        trainer_ref.append(trainer)
        if state is not None and "step_totals" in state:  # the sums of the steps before the resume
            trainer.step_totals.update(state["step_totals"])
        metrics: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except OSError as e:  # a full or read-only disk: no unfinished checkpoint is left behind
            if _is_main():
                remove_unsealed(work_dir)
            raise filesystem_error(e, work_dir) from None
        initial = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "InitialValidLoss")
        if initial.value is not None:
            metrics["eval_loss_initial"] = initial.value
        metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
        metrics["train_wall_s"] = time.perf_counter() - started
        totals = trainer.step_totals  # whole-batch, all-reduced step values of the whole run (resumes included)
        if totals["steps"]:
            metrics["train_loss"] = totals["loss"] / totals["steps"]  # the Trainer's counts only since a resume
            metrics["train_loss_sft"] = totals["loss_sft"] / totals["steps"]
            if config.objective == "gdrt":
                metrics["train_loss_gdrt"] = totals["loss_gdrt"] / totals["steps"]
        # the valid NDCG@10 of every evaluation during training (epoch ends), before the kept model's own
        ndcg = [(h["step"], h["eval_ndcg@10"]) for h in trainer.state.log_history if "eval_ndcg@10" in h]
        if ndcg:
            metrics["valid_ndcg_curve"] = [{"step": s, "ndcg@10": v} for s, v in ndcg]
            metrics["eval_ndcg@10"] = ndcg[-1][1]
        if valid_features:
            # the kept model (the best checkpoint when selecting) was evaluated at its step already, unless the
            # last evaluation came before the last step: evaluate it again only then (valid NDCG is a beam search)
            kept_step = _checkpoint_step(trainer.state.best_model_checkpoint) if config.select_best != "none" else None
            final = _logged_evaluation(trainer.state.log_history, kept_step or trainer.state.global_step,
                                       with_ndcg=trainer.ndcg_in_evaluate) or trainer.evaluate()
            metrics["eval_loss"] = final["eval_loss"]
            if "eval_ndcg@10" in final:
                metrics["eval_ndcg@10"] = final["eval_ndcg@10"]
        metrics["global_step"] = trainer.state.global_step
        metrics["num_train_examples"] = len(train_features)
        if config.select_best != "none":
            metrics["selected_by"] = config.select_best
            metrics["best_checkpoint_step"] = _checkpoint_step(trainer.state.best_model_checkpoint)
            metrics["best_metric"] = trainer.state.best_metric

        final_dir = work_dir / "final"
        trainer.save_model(str(final_dir))  # collective under ZeRO-3: every rank takes part
        _barrier()
        if not _is_main():
            return None
        check_adapter_not_empty(final_dir)
        inputs = {"dataset": config.dataset}
        if config.groups:
            inputs["groups"] = config.groups
        with atomic_output_dir(out, kind="model", inputs=train_inputs(config), keep=(CHECKPOINTS,)) as tmp:
            for p in final_dir.iterdir():
                if p.is_file() and p.name != "training_args.bin":
                    shutil.copy2(p, tmp / p.name)
            _point_adapter_at_base(tmp, _base_reference(config.model))
            tokenizer.save_pretrained(str(tmp))
            with open(tmp / "config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(to_dict(config), f, sort_keys=False)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))
            write_json_atomic(tmp / "train_metrics.json", metrics)
            manifest = write_manifest(
                tmp, "model", config=to_dict(config), inputs=inputs, base_model=_base_reference(config.model),
                objective=config.objective, adapter=(tmp / "adapter_model.safetensors").is_file(),
                domain=dataset.domain, num_groups=num_groups, metrics=metrics,
            )
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=trainer.state.global_step)
        tracker.log_artifacts(out, "model")
    return manifest


def _logged_evaluation(log_history: list[dict], step: int, *, with_ndcg: bool) -> dict | None:
    """The evaluation logged at optimiser step `step`: its `eval_loss`, and its `eval_ndcg@10` when evaluate()
    computes it (logged as an entry of its own), or None when either is missing at that step."""
    found: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") == step:
            found.update({k: entry[k] for k in ("eval_loss", "eval_ndcg@10") if k in entry})
    wanted = ("eval_loss", "eval_ndcg@10") if with_ndcg else ("eval_loss",)
    return found if all(k in found for k in wanted) else None


def _checkpoint_step(path: str | None) -> int | None:
    """The step of a `checkpoint-<step>` directory (None when no checkpoint was selected)."""
    if not path:
        return None
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") else None


def _point_adapter_at_base(model_dir: Path, base: str) -> None:
    """An adapter names its base model; make a local one absolute so it loads from any directory."""
    path = model_dir / "adapter_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base
        path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def _base_reference(model: str) -> str:
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def read_train_metrics(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "train_metrics.json").read_text(encoding="utf-8"))
