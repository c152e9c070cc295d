"""The train stage: SFT or GDRT fine-tuning of a causal LM recommender -> Model artifact.

`run(config)` trains in the current process, or, when several processes or DeepSpeed are asked for,
re-executes `gdrt train` under torchrun with the resolved config. Checkpoints go to `<out>/checkpoints/`
every `save_every` steps; re-running the same command resumes from the newest intact one. The final
Model artifact (weights or LoRA adapter, tokenizer, config.yaml, trainer_state.json, train_metrics.json,
manifest.json) replaces `<out>` atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdrt_core.config import check_config, field, to_dict
from gdrt_core.errors import GdrtError
from gdrt_core.train.deepspeed import STAGES as DEEPSPEED_STAGES

CHECKPOINTS = "checkpoints"


def _optimiser_problem(name: str) -> str | None:
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    return None if name in known else f"unknown optimiser (the Trainer knows {', '.join(known)})"


def _scheduler_problem(name: str) -> str | None:
    from transformers.trainer_utils import SchedulerType

    known = [s.value for s in SchedulerType]
    return None if name in known else f"unknown learning-rate schedule (the Trainer knows {', '.join(known)})"


SEED_MAX = 2**32 - 1  # numpy's seed range (the Trainer seeds numpy, random and torch)
MAX_GROUPS = 128  # group ids are stored as int8 (0..127) in the Groups artifact


@dataclass
class TrainConfig:
    dataset: str = field(path=True, help="Dataset artifact directory (gdrt curate)")
    model: str = field(path=True, help="base model: hub id or directory (gdrt init-model writes one)")
    out: str = field(path=True, help="output Model directory (checkpoints live in <out>/checkpoints while training)")
    objective: str = field("sft", choices=("sft", "gdrt"),
                           help="sft (token-mean cross-entropy) | gdrt (group-DRO over token groups)")
    groups: str | None = field(None, path=True, help="Groups artifact directory (gdrt group); required for objective gdrt")
    num_groups: int | None = field(None, ge=1, le=MAX_GROUPS,
                                   help="number of token groups (default: from the Groups artifact)")
    tau: float = field(1.0, gt=0, help="GDRT temperature: large -> prior-weighted mean, small -> worst group")
    prior: str = field("uniform", choices=("uniform", "size"), help="group prior pi: uniform | size (group token frequency)")
    weights: str = field("batch", choices=("batch", "lagged"),
                         help="weights policy: batch (exact, look-ahead when split) | lagged (previous step)")
    ema: float = field(0.0, ge=0, lt=1, help="moving average of the group losses used for the weights, in [0, 1); 0 = off")
    lr: float = field(1e-4, gt=0, help="peak learning rate")
    epochs: float = field(3.0, gt=0, help="training epochs (ignored when max_steps is set)")
    max_steps: int | None = field(None, ge=1, help="stop after this many optimiser steps (None = epochs)")
    batch_size: int = field(8, ge=1, help="per-device micro-batch size")
    grad_accum: int = field(1, ge=1, help="gradient accumulation steps (optimiser batch = batch_size x accum x processes)")
    optim: str = field("adamw_torch", check=_optimiser_problem, help="Trainer optimiser name (adamw_torch, sgd, ...)")
    weight_decay: float = field(0.0, ge=0, help="weight decay")
    warmup_ratio: float = field(0.0, ge=0, lt=1, help="share of the steps with a linear learning-rate warm-up")
    scheduler: str = field("linear", check=_scheduler_problem, help="learning-rate schedule (Trainer lr_scheduler_type)")
    max_grad_norm: float = field(1.0, ge=0, help="gradient clipping norm (0 = off)")
    seed: int = field(42, ge=0, le=SEED_MAX, help="seed of the model initialisation (LoRA) and dropout")
    data_seed: int | None = field(None, ge=0, le=SEED_MAX, help="seed of the data order (None = seed); kept across a resume")
    sampling: str = field("random", choices=("random", "group_by_length"),
                          help="order of the training windows: random | group_by_length (batches of similar "
                               "length, less padding; transformers' length grouping, seeded by data_seed)")
    max_train: int | None = field(None, ge=1, help="use at most this many training windows (the first N)")
    valid_size: int = field(200, ge=0, help="valid windows used for the valid loss and NDCG@10 (the first N)")
    eval_every: int = field(50, ge=0, help="evaluate the valid loss every N optimiser steps (0 = once per epoch)")
    save_every: int = field(50, ge=0, help="write a checkpoint every N optimiser steps (0 = once per epoch)")
    keep_checkpoints: int = field(2, ge=1, help="checkpoints kept in <out>/checkpoints while training")
    log_every: int = field(10, ge=1, help="log loss / group stats / tokens/s every N optimiser steps")
    select_best: bool | str = field(
        False, help="finish with the checkpoint of the best valid metric, never test: false | valid_loss (= true) | "
        "valid_ndcg@10 (NDCG@10 of the first valid_size valid windows at every epoch end)"
    )
    eval_at_start: bool = field(True, help="evaluate the valid loss before training (stored in train_metrics.json)")
    ndcg_every_epoch: bool = field(True, help="valid NDCG@10 on the valid sample at each epoch end")
    lora: bool = field(True, help="train LoRA adapters (False = full fine-tuning)")
    lora_r: int = field(8, ge=1, help="LoRA rank")
    lora_alpha: int = field(16, ge=1, help="LoRA alpha")
    lora_dropout: float = field(0.05, ge=0, lt=1, help="LoRA dropout")
    lora_target_modules: list[str] = field(
        ["q_proj", "v_proj"], check=lambda v: None if v else "name at least one module",
        help="modules that get LoRA adapters (GPT-2: c_attn; auto = peft's default for the model)",
    )
    bf16: bool | str = field("auto", help="auto (bf16 on a GPU that supports it, fp32 on CPU) | true | false")
    deepspeed: str | None = field(None, choices=DEEPSPEED_STAGES, help="DeepSpeed ZeRO: zero2 | zero3 | zero3-offload (None = off)")
    num_gpus: int = field(1, ge=1, help="processes to launch (one per GPU; on CPU, processes over gloo)")
    trust_remote_code: bool = field(False, help="run modelling code shipped with a hub model")
    cpu_threads: int | None = field(None, ge=1, help="torch threads when training on CPU (None = torch's default)")

    def check(self, source: str) -> None:
        """The rules across settings (each setting's own range is checked from its field)."""
        if self.objective == "gdrt" and not self.groups:
            raise GdrtError("objective gdrt needs token groups", path=source,
                            hint="pass --groups DIR (written by gdrt group)")
        self.bf16 = str(self.bf16).lower()  # YAML / --set give a boolean for true and false
        if self.bf16 not in ("auto", "true", "false"):
            raise GdrtError(f"bf16 {self.bf16!r} is not auto, true or false", path=source)
        self.select_best = selection_metric(self.select_best, source)
        selecting = self.select_best != "none"
        if self.select_best == "valid_ndcg@10":
            if self.eval_every or self.save_every:
                raise GdrtError("select_best valid_ndcg@10 is evaluated at epoch ends: it needs eval_every 0 and "
                                "save_every 0", path=source, hint="--set eval_every=0 --set save_every=0")
            if self.valid_size < 1:
                raise GdrtError("select_best valid_ndcg@10 needs valid windows (valid_size >= 1)", path=source)
            if self.deepspeed in ("zero3", "zero3-offload"):
                raise GdrtError("select_best valid_ndcg@10 ranks on one process, which ZeRO-3's sharded weights "
                                "do not allow", path=source, hint="use zero2, or select_best valid_loss")
        if selecting and (self.save_every == 0) != (self.eval_every == 0):
            raise GdrtError("select_best needs eval_every and save_every both per epoch (0) or both in steps",
                            path=source, hint="e.g. --set eval_every=0 --set save_every=0")
        if selecting and self.save_every and self.eval_every and self.save_every % self.eval_every:
            raise GdrtError("select_best needs save_every to be a multiple of eval_every", path=source)


# select_best value -> (Trainer metric name without the eval_ prefix, greater is better)
SELECTION_METRICS = {"valid_loss": ("loss", False), "valid_ndcg@10": ("ndcg@10", True)}


def selection_metric(value: bool | str, source: str = "train config") -> str:
    """The select_best setting as none | valid_loss | valid_ndcg@10 (true = valid_loss, false = none)."""
    text = str(value).strip().lower()
    if value is True or text == "true":
        return "valid_loss"
    if value is False or text in ("false", "none", ""):
        return "none"
    if text not in SELECTION_METRICS:
        raise GdrtError(f"select_best {value!r} is unknown", path=source,
                        hint=f"use false, {', '.join(SELECTION_METRICS)} (true = valid_loss)")
    return text


def validate(config: TrainConfig, source: str = "train config") -> None:
    """Every setting in its range and the rules across settings: before any heavy import or output."""
    check_config(config, source)


def train_inputs(config: TrainConfig) -> dict[str, str | None]:
    """The inputs of a training run, by name (what the output must never replace, what a resume must match)."""
    return {"dataset": config.dataset, "model": config.model, "groups": config.groups}


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Train and write the Model artifact; returns its manifest (None in a non-zero rank).

    Before any work: every setting checked, the output checked (never an input, never a directory that is
    not a Model artifact or an interrupted run's checkpoints), the output locked against a second
    `gdrt train`, the checkpoints found there checked to belong to these settings and inputs, and the Groups
    artifact read in full (`grouping.read_groups`) before any model is loaded or worker launched.
    """
    import contextlib

    from gdrt_core.artifacts import check_output, exclusive, remove_if_empty
    from gdrt_core.dataset import Dataset
    from gdrt_core.tracking import is_rank_zero
    from gdrt_core.train.deepspeed import LAUNCHED_ENV
    from gdrt_core.train.resume import check_same_run, run_fingerprint

    validate(config)
    check_output(config.out, "model", inputs=train_inputs(config), keep=(CHECKPOINTS,))
    Dataset(config.dataset).require_examples("train", "to train on")  # (its files checked against the manifest)
    first_process = is_rank_zero() and not os.environ.get(LAUNCHED_ENV)  # not a worker of our own launch
    with exclusive(config.out, "gdrt train") if first_process else contextlib.nullcontext():
        if first_process:
            check_same_run(Path(config.out) / CHECKPOINTS, run_fingerprint(to_dict(config), train_inputs(config)),
                           defaults=to_dict(TrainConfig(dataset="", model="", out="")))
        fresh = [p for p in (Path(config.out) / CHECKPOINTS, Path(config.out)) if not p.exists()]
        try:
            return _run_locked(config)
        except BaseException:  # e.g. Ctrl-C before the first checkpoint: no empty output left behind
            if first_process:
                remove_if_empty(fresh)
            raise


def _run_locked(config: TrainConfig) -> dict[str, Any] | None:
    from gdrt_core.tracking import (
        check_reachable,
        current_context,
        is_rank_zero,
        tracking_enabled,
        tracking_uri,
    )
    from gdrt_core.train.deepspeed import needs_launch, relaunch_under_torchrun

    if tracking_enabled() and is_rank_zero():
        check_reachable(tracking_uri())  # fail before any training, naming the URI
    if needs_launch(config.num_gpus, config.deepspeed):
        import tempfile

        import yaml

        from gdrt_core.artifacts import make_parents, read_manifest, remove_if_empty
        from gdrt_core.grouping import read_groups

        if config.objective == "gdrt" and config.groups:  # one error here, not one per launched worker
            read_groups(config.groups)  # (a single process reads it once, in `loop.train`, before the model)

        created = make_parents(config.out)
        try:
            fd, cfg_path = tempfile.mkstemp(prefix=".gdrt-train-", suffix=".yaml",
                                            dir=Path(config.out).absolute().parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    yaml.safe_dump(to_dict(config), f, sort_keys=False)
                relaunch_under_torchrun(config.num_gpus, [
                    "train", "--dataset", config.dataset, "--model", config.model, "--out", config.out,
                    "--config", cfg_path, *current_context().args(),  # the workers log under the same parent run
                ], deepspeed=config.deepspeed)
            finally:
                os.unlink(cfg_path)
        finally:
            remove_if_empty(created)  # after a failure (the output, once written, keeps its directory)
        return read_manifest(config.out, "model", verify=False)
    from gdrt_core.train.loop import finish_distributed, train

    try:
        result = train(config)
    except BaseException:
        finish_distributed(wait=False)
        raise
    finish_distributed(wait=True)
    return result


def summary_line(config: TrainConfig, manifest: dict | None) -> str | None:
    """The one line `gdrt train` prints; None (nothing) in a rank other than 0, and in the workers of a run that
    `gdrt train` relaunched as several processes (the launching process prints it once)."""
    from gdrt_core.train.deepspeed import LAUNCHED_ENV

    if manifest is None or os.environ.get(LAUNCHED_ENV):
        return None
    m = manifest.get("metrics", {})
    return f"trained {config.objective} -> {config.out}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)
    )
